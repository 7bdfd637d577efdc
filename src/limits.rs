//! Rate limits and token budgets per credential and per agent: `requests_per_minute`
//! (a token bucket: bursts up to the minute's allowance, refilled continuously) and
//! `tokens_per_day` (LLM tokens reported by responses, per UTC day). State is keyed by
//! name and lives with the proxy, not the config, so a reload keeps it; the limits
//! themselves are read from the config in force at each request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_day: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_day.is_none()
    }
}

/// Whose limit: a credential's or an agent's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Credential,
    Agent,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Credential => "credential",
            Scope::Agent => "agent",
        }
    }
}

/// Why a request was refused, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub scope: Scope,
    pub name: String,
    pub limit: &'static str,
    pub retry_after_secs: u64,
}

#[derive(Debug)]
struct State {
    bucket: f64,
    refilled: Instant,
    day: u64,
    tokens_today: u64,
}

#[derive(Debug, Default)]
pub struct Limiter {
    state: Mutex<HashMap<(Scope, String), State>>,
}

fn utc_day_and_secs_left() -> (u64, u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    (now / 86_400, 86_400 - now % 86_400)
}

impl Limiter {
    /// Admit one request against every `(scope, name, limits)` given, or refuse it
    /// without charging any of them.
    pub fn admit(&self, checks: &[(Scope, &str, Limits)]) -> Result<(), Exceeded> {
        self.admit_at(checks, Instant::now(), utc_day_and_secs_left())
    }

    fn admit_at(
        &self,
        checks: &[(Scope, &str, Limits)],
        now: Instant,
        (day, secs_left): (u64, u64),
    ) -> Result<(), Exceeded> {
        let mut map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for (scope, name, limits) in checks.iter().filter(|c| !c.2.is_empty()) {
            let st = map.entry((*scope, name.to_string())).or_insert_with(|| State {
                bucket: f64::from(limits.requests_per_minute.unwrap_or(0)),
                refilled: now,
                day,
                tokens_today: 0,
            });
            if st.day != day {
                st.day = day;
                st.tokens_today = 0;
            }
            let exceeded = |limit, retry_after_secs| Exceeded {
                scope: *scope,
                name: name.to_string(),
                limit,
                retry_after_secs,
            };
            if let Some(budget) = limits.tokens_per_day
                && st.tokens_today >= budget
            {
                return Err(exceeded("tokens_per_day", secs_left));
            }
            if let Some(rpm) = limits.requests_per_minute {
                let cap = f64::from(rpm);
                let per_sec = cap / 60.0;
                st.bucket = (st.bucket + now.duration_since(st.refilled).as_secs_f64() * per_sec).min(cap);
                st.refilled = now;
                if st.bucket < 1.0 {
                    let wait = if per_sec > 0.0 { ((1.0 - st.bucket) / per_sec).ceil() as u64 } else { 60 };
                    return Err(exceeded("requests_per_minute", wait.max(1)));
                }
            }
        }
        for (scope, name, limits) in checks {
            if limits.requests_per_minute.is_some()
                && let Some(st) = map.get_mut(&(*scope, name.to_string()))
            {
                st.bucket -= 1.0;
            }
        }
        Ok(())
    }

    /// LLM tokens charged to `name` today (UTC), for the live view.
    pub fn tokens_today(&self, scope: Scope, name: &str) -> u64 {
        let (day, _) = utc_day_and_secs_left();
        let map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(scope, name.to_string())).filter(|st| st.day == day).map_or(0, |st| st.tokens_today)
    }

    /// Charge LLM tokens a response reported.
    pub fn spend(&self, scope: Scope, name: &str, tokens: u64) {
        let (day, _) = utc_day_and_secs_left();
        let mut map = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = map.entry((scope, name.to_string())).or_insert_with(|| State {
            bucket: 0.0,
            refilled: Instant::now(),
            day,
            tokens_today: 0,
        });
        if st.day != day {
            st.day = day;
            st.tokens_today = 0;
        }
        st.tokens_today = st.tokens_today.saturating_add(tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DAY: (u64, u64) = (20_000, 3_600);

    fn rpm(n: u32) -> Limits {
        Limits { requests_per_minute: Some(n), tokens_per_day: None }
    }

    #[test]
    fn bucket_allows_the_minute_then_refills() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let c = [(Scope::Credential, "a", rpm(3))];
        for _ in 0..3 {
            l.admit_at(&c, t0, DAY).unwrap();
        }
        let e = l.admit_at(&c, t0, DAY).unwrap_err();
        assert_eq!((e.limit, e.retry_after_secs), ("requests_per_minute", 20));
        l.admit_at(&c, t0 + Duration::from_secs(20), DAY).unwrap();
        assert!(l.admit_at(&c, t0 + Duration::from_secs(21), DAY).is_err());
    }

    #[test]
    fn a_refusal_charges_no_scope() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let both = [(Scope::Credential, "c", rpm(10)), (Scope::Agent, "a", rpm(1))];
        l.admit_at(&both, t0, DAY).unwrap();
        assert_eq!(l.admit_at(&both, t0, DAY).unwrap_err().scope, Scope::Agent);
        // The credential was charged once, not twice: nine more fit.
        let cred = [(Scope::Credential, "c", rpm(10))];
        for _ in 0..9 {
            l.admit_at(&cred, t0, DAY).unwrap();
        }
        assert!(l.admit_at(&cred, t0, DAY).is_err());
    }

    #[test]
    fn token_budget_lasts_the_utc_day() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let c = [(Scope::Agent, "bot", Limits { requests_per_minute: None, tokens_per_day: Some(100) })];
        l.admit_at(&c, t0, DAY).unwrap();
        l.spend(Scope::Agent, "bot", 60);
        l.admit_at(&c, t0, utc_day_and_secs_left()).unwrap();
        l.spend(Scope::Agent, "bot", 60);
        let e = l.admit_at(&c, t0, utc_day_and_secs_left()).unwrap_err();
        assert_eq!(e.limit, "tokens_per_day");
        let (day, _) = utc_day_and_secs_left();
        l.admit_at(&c, t0, (day + 1, 86_400)).expect("a new day, a new budget");
    }
}

//! `requests_per_minute` and `tokens_per_day` enforced in Redis, across replicas.
//!
//! Admission is one Lua script (atomic in Redis: no two replicas can take the same
//! permit): it checks every budget the request falls under, then takes from every
//! rate bucket, or refuses without taking anything. The bucket is the per-replica
//! limiter's (`crate::limits`): bursts up to the minute's allowance, refilled
//! continuously, on Redis's clock (`TIME`), so replicas' clocks do not matter. Token
//! budgets are per UTC day on the same clock; what a response reports is added when
//! it ends (queued while Redis is down, sent when it is back).
//!
//! **Batches.** A round trip per request would cost more than the request (the bench
//! row: keep-alive with a limit). So a replica takes up to [`batch`] permits at once
//! — 1 below 600 requests per minute, `rpm / 600` above (a tenth of a second of the
//! allowance), at most 64 — and uses them for the next requests, within [`HELD_FOR`];
//! those not used by then are dropped. A permit is taken from the shared bucket before
//! it is used, so the replicas together never admit more than the bucket gives; the
//! cost of batching is that a held permit may be used up to `HELD_FOR` after it left
//! the bucket (a burst above the limit's shape of at most `replicas × batch` requests
//! over any window), and dropped permits are lost to everyone. A request under a
//! `tokens_per_day` budget always asks Redis (the budget is read fresh each time).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;

use super::store::{RETRY, Store, Unavailable};
use crate::limits::{Exceeded, Limits, Scope};

/// How long permits taken in a batch may be used.
pub const HELD_FOR: Duration = Duration::from_secs(1);

/// Most permits taken in one batch.
pub const MAX_BATCH: u32 = 64;

/// Permits taken at once for a limit of `rpm` per minute: a tenth of a second of the
/// allowance, at least 1, at most [`MAX_BATCH`]. Exact (one round trip per request)
/// below 600 per minute.
pub fn batch(rpm: u32) -> u32 {
    (rpm / 600).clamp(1, MAX_BATCH)
}

const ADMIT: &str = r"
local t = redis.call('TIME')
local secs = tonumber(t[1])
local now = secs * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(secs / 86400)
local n = tonumber(ARGV[1])
local level = {}
for i = 1, n do
  local rpm = tonumber(ARGV[3 * i - 1])
  local want = tonumber(ARGV[3 * i])
  local budget = tonumber(ARGV[3 * i + 1])
  if budget >= 0 then
    local spent = tonumber(redis.call('GET', KEYS[2 * i] .. ':' .. day) or '0')
    if spent >= budget then
      return {i, 2, 86400 - secs % 86400}
    end
  end
  if rpm > 0 and want > 0 then
    local h = redis.call('HMGET', KEYS[2 * i - 1], 'level', 'at')
    local lvl = tonumber(h[1]) or rpm
    local at = tonumber(h[2]) or now
    if now > at then
      lvl = lvl + (now - at) * rpm / 60000
    end
    lvl = math.min(lvl, rpm)
    if lvl < 1 then
      return {i, 1, math.max(1, math.ceil((1 - lvl) * 60 / rpm))}
    end
    level[i] = lvl
  end
end
local granted = {0}
for i = 1, n do
  local g = 0
  if level[i] then
    g = math.min(tonumber(ARGV[3 * i]), math.floor(level[i]))
    redis.call('HSET', KEYS[2 * i - 1], 'level', tostring(level[i] - g), 'at', now)
    redis.call('PEXPIRE', KEYS[2 * i - 1], 120000)
  end
  granted[i + 1] = g
end
return granted
";

const SPEND: &str = r"
local day = math.floor(tonumber(redis.call('TIME')[1]) / 86400)
for i = 1, #KEYS do
  local k = KEYS[i] .. ':' .. day
  redis.call('INCRBY', k, ARGV[i])
  redis.call('EXPIRE', k, 172800)
end
return 0
";

/// Permits this replica took from a shared bucket and has not used yet.
#[derive(Debug)]
struct Held {
    permits: u32,
    taken: Instant,
    /// The limit they were taken under (a reload that changes it drops them).
    rpm: u32,
}

pub struct SharedLimits {
    store: Arc<Store>,
    /// Held permits, by scope (credential, agent) and name.
    held: Mutex<[HashMap<Box<str>, Held>; 2]>,
    /// LLM tokens spent and not yet added in Redis.
    unsent: Mutex<HashMap<(Scope, Box<str>), u64>>,
    flushing: AtomicBool,
    admit: Script,
    spend: Script,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits").field("store", &self.store).finish_non_exhaustive()
    }
}

fn slot(scope: Scope) -> usize {
    match scope {
        Scope::Credential => 0,
        Scope::Agent => 1,
    }
}

impl SharedLimits {
    pub fn new(store: Arc<Store>) -> SharedLimits {
        SharedLimits {
            store,
            held: Mutex::default(),
            unsent: Mutex::default(),
            flushing: AtomicBool::new(false),
            admit: Script::new(ADMIT),
            spend: Script::new(SPEND),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Admit one request under every `(scope, name, limits)`, or say which is spent
    /// (charging none), or that Redis could not be asked.
    pub async fn admit(&self, checks: &[(Scope, &str, Limits)]) -> Result<Result<(), Exceeded>, Unavailable> {
        let checks: Vec<&(Scope, &str, Limits)> = checks.iter().filter(|c| !c.2.is_empty()).collect();
        let (local, done) = self.take_held(&checks);
        if done {
            return Ok(Ok(()));
        }
        let answer = self.ask(&checks, &local).await;
        match &answer {
            Ok(Ok(granted)) => self.keep(&checks, granted),
            _ => self.give_back(&checks, &local),
        }
        answer.map(|r| r.map(|_| ()))
    }

    /// Take one held permit for each rate limit that has one. Done when that covers
    /// every check (no rate limit without a permit, no token budget to read).
    fn take_held(&self, checks: &[&(Scope, &str, Limits)]) -> (Vec<bool>, bool) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut local = vec![false; checks.len()];
        for (i, (scope, name, limits)) in checks.iter().enumerate() {
            let Some(rpm) = limits.requests_per_minute else { continue };
            if let Some(h) = held[slot(*scope)].get_mut(*name)
                && h.permits > 0
                && h.rpm == rpm
                && h.taken.elapsed() < HELD_FOR
            {
                h.permits -= 1;
                local[i] = true;
            }
        }
        let done = checks.iter().zip(&local).all(|((_, _, l), took)| {
            l.tokens_per_day.is_none() && (l.requests_per_minute.is_none() || *took)
        });
        (local, done)
    }

    /// A refused or failed request returns the permits it took locally.
    fn give_back(&self, checks: &[&(Scope, &str, Limits)], local: &[bool]) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for ((scope, name, _), _) in checks.iter().zip(local).filter(|(_, took)| **took) {
            if let Some(h) = held[slot(*scope)].get_mut(*name) {
                h.permits += 1;
            }
        }
    }

    /// Keep the permits Redis granted beyond the one this request uses.
    fn keep(&self, checks: &[&(Scope, &str, Limits)], granted: &[u32]) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for ((scope, name, limits), g) in checks.iter().zip(granted) {
            let (Some(rpm), true) = (limits.requests_per_minute, *g > 1) else { continue };
            match held[slot(*scope)].get_mut(*name) {
                // Concurrent batches add up; they expire with the oldest (never later).
                Some(h) if h.rpm == rpm && h.taken.elapsed() < HELD_FOR => h.permits += g - 1,
                _ => {
                    held[slot(*scope)]
                        .insert((*name).into(), Held { permits: g - 1, taken: Instant::now(), rpm });
                }
            }
        }
    }

    /// The admission script: permits granted per check (0 where none was asked), or
    /// the check that is spent.
    async fn ask(
        &self,
        checks: &[&(Scope, &str, Limits)],
        local: &[bool],
    ) -> Result<Result<Vec<u32>, Exceeded>, Unavailable> {
        let mut inv = self.admit.prepare_invoke();
        inv.arg(checks.len());
        for ((scope, name, limits), took) in checks.iter().zip(local) {
            inv.key(self.store.key(&["rate", scope.as_str(), name]));
            inv.key(self.store.key(&["tokens", scope.as_str(), name]));
            let rpm = limits.requests_per_minute.unwrap_or(0);
            let want = if rpm > 0 && !took { batch(rpm) } else { 0 };
            let budget = limits.tokens_per_day.map(|b| b.min(i64::MAX as u64) as i64).unwrap_or(-1);
            inv.arg(rpm).arg(want).arg(budget);
        }
        let reply: Vec<i64> =
            self.store.run("admit", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        let exceeded = |i: i64, which: i64, retry: i64| {
            let (scope, name, _) = checks[(i - 1).max(0) as usize];
            Exceeded {
                scope: *scope,
                name: name.to_string(),
                limit: if which == 2 { "tokens_per_day" } else { "requests_per_minute" },
                retry_after_secs: retry.max(1) as u64,
            }
        };
        match reply.as_slice() {
            [0, granted @ ..] if granted.len() == checks.len() => {
                Ok(Ok(granted.iter().map(|g| (*g).clamp(0, i64::from(u32::MAX)) as u32).collect()))
            }
            [i, which, retry] if *i >= 1 && (*i as usize) <= checks.len() => {
                Ok(Err(exceeded(*i, *which, *retry)))
            }
            _ => {
                tracing::error!("shared state: unexpected answer from the admission script: {reply:?}");
                Err(Unavailable)
            }
        }
    }

    /// Add LLM tokens a response reported to the shared budgets (in the background;
    /// kept and sent later while Redis is down).
    pub fn spend(self: &Arc<Self>, scope: Scope, name: &str, tokens: u64) {
        *self.unsent.lock().unwrap_or_else(|p| p.into_inner()).entry((scope, name.into())).or_default() +=
            tokens;
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.flushing.store(false, Ordering::Release);
            return;
        };
        let me = self.clone();
        rt.spawn(async move { me.flush().await });
    }

    fn put_back(&self, batch: Vec<((Scope, Box<str>), u64)>) {
        let mut unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
        for (k, n) in batch {
            *unsent.entry(k).or_default() += n;
        }
    }

    /// Send what is unsent until nothing is (one task at a time).
    async fn flush(&self) {
        loop {
            let batch: Vec<((Scope, Box<str>), u64)> =
                self.unsent.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
            if batch.is_empty() {
                self.flushing.store(false, Ordering::Release);
                // Something added between the drain and the flag: go on if no one did.
                let more = !self.unsent.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                if more && !self.flushing.swap(true, Ordering::AcqRel) {
                    continue;
                }
                return;
            }
            let mut inv = self.spend.prepare_invoke();
            for ((scope, name), n) in &batch {
                inv.key(self.store.key(&["tokens", scope.as_str(), name])).arg(*n);
            }
            let sent: Result<i64, _> =
                self.store.run("spend", |mut c| async move { inv.invoke_async(&mut c).await }).await;
            if sent.is_err() {
                self.put_back(batch);
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_exact_for_small_limits_and_bounded_for_large() {
        assert_eq!(batch(10), 1);
        assert_eq!(batch(599), 1);
        assert_eq!(batch(6_000), 10);
        assert_eq!(batch(u32::MAX), MAX_BATCH);
    }
}

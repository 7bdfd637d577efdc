//! Approvals shared by replicas (SPEC 10 and 12): what is pending and what a person
//! decided, in Redis, so a request held on one replica is listed and answered on any.
//!
//! Keys (under `key_prefix`):
//! - `approvals:pending` — hash, destination (`host:port`) → id of its open approval;
//! - `approvals:entry:<id>` — hash `info` (the JSON the API shows), `dest`, `pattern`,
//!   `waiting`; it **expires at the approval's deadline** (`ask_timeout` of the replica
//!   that opened it), so an approval whose replica died still ends on time;
//! - `approvals:decided:<id>` — `allowed`, `denied` or `unanswered`, for 5 minutes:
//!   how waiters on every replica learn the answer;
//! - `approvals:run` — set of destinations allowed with scope `run`; every replica
//!   renews its expiry, so it lapses [`RUN_TTL`] after the last replica stopped;
//! - `approvals:always` — hash, `allowed_domains` pattern → `allow` or `deny`;
//! - `approvals:version` — bumped by every change of the pending list (the live view).
//!
//! Opening, deciding and expiring are Lua scripts (atomic: concurrent asks on several
//! replicas open one approval, with one id and one opener; an answer and the deadline
//! cannot both win). Waiters learn answers by polling `decided` every [`POLL`] while
//! their replica holds something (see `watch`): no second connection to keep
//! subscribed, no message lost while reconnecting, and every call goes through
//! `Store::run` (one time limit, one outage rule).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::Script;
use tokio::sync::watch;

use super::store::{Store, Unavailable};
use crate::approvals::file::{self, Standing};
use crate::approvals::{Asking, Choice, DecideError, Pending, Scope};
use crate::policy::{Destination, Pattern, Verdict};

/// How often a replica holding requests looks for answers given elsewhere.
pub const POLL: Duration = Duration::from_millis(200);
/// How often a replica renews the `run` answers' expiry.
pub const RUN_RENEW: Duration = Duration::from_secs(10);
/// How long `run` answers outlive the last replica that renewed them.
pub const RUN_TTL: Duration = Duration::from_secs(60);
/// How long an answer stays readable after it was given (seconds).
const DECIDED_TTL: u64 = 300;

const JOIN: &str = r"
local id = redis.call('HGET', KEYS[1], ARGV[1])
if id then
  local key = ARGV[2] .. id
  local left = redis.call('PTTL', key)
  if left > 0 then
    redis.call('HINCRBY', key, 'waiting', 1)
    redis.call('INCR', KEYS[2])
    return {0, id, left}
  end
end
local key = ARGV[2] .. ARGV[3]
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', key, 'info', ARGV[4], 'dest', ARGV[1], 'pattern', ARGV[6], 'waiting', 1)
redis.call('PEXPIRE', key, ARGV[5])
redis.call('INCR', KEYS[2])
return {1, ARGV[3], tonumber(ARGV[5])}
";

const DECIDE: &str = r"
local key = ARGV[1] .. ARGV[3]
local e = redis.call('HMGET', key, 'info', 'dest', 'pattern', 'waiting')
if not e[1] then return false end
redis.call('DEL', key)
if redis.call('HGET', KEYS[1], e[2]) == ARGV[3] then redis.call('HDEL', KEYS[1], e[2]) end
redis.call('SET', ARGV[2] .. ARGV[3], ARGV[4], 'EX', ARGV[8])
if ARGV[5] == '1' then
  redis.call('SADD', KEYS[3], e[2])
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[4], e[3], ARGV[6]) end
redis.call('INCR', KEYS[2])
return {e[1], tonumber(e[4])}
";

const EXPIRE: &str = r"
local d = redis.call('GET', ARGV[2] .. ARGV[3])
if d then return d end
local key = ARGV[1] .. ARGV[3]
local dest = redis.call('HGET', key, 'dest')
if dest then
  redis.call('DEL', key)
  if redis.call('HGET', KEYS[1], dest) == ARGV[3] then redis.call('HDEL', KEYS[1], dest) end
end
redis.call('SET', ARGV[2] .. ARGV[3], 'unanswered', 'EX', ARGV[4])
redis.call('INCR', KEYS[2])
return 'unanswered'
";

const LIST: &str = r"
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local e = redis.call('HMGET', ARGV[1] .. all[i + 1], 'info', 'waiting')
  if e[1] then
    table.insert(out, {e[1], tonumber(e[2])})
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return out
";

/// What a waiter joined: the approval's id, whether it opened it (and so tells the
/// webhook), the answer when it comes, and how long is left before the deadline.
pub struct Joined {
    pub id: String,
    pub opened: bool,
    pub answer: watch::Receiver<Option<Verdict>>,
    pub left: Duration,
}

struct Waiting {
    tx: watch::Sender<Option<Verdict>>,
    deadline: Instant,
}

pub struct SharedApprovals {
    store: Arc<Store>,
    /// The answer channel of each approval this replica holds requests for, by id, and
    /// when its deadline passes.
    waiters: Mutex<HashMap<String, Waiting>>,
    join: Script,
    decide: Script,
    expire: Script,
    list: Script,
}

impl SharedApprovals {
    pub fn new(store: Arc<Store>) -> Arc<SharedApprovals> {
        Arc::new(SharedApprovals {
            store,
            waiters: Mutex::default(),
            join: Script::new(JOIN),
            decide: Script::new(DECIDE),
            expire: Script::new(EXPIRE),
            list: Script::new(LIST),
        })
    }

    pub fn fails_open(&self) -> bool {
        self.store.fails_open()
    }

    pub fn server(&self) -> &str {
        self.store.server()
    }

    fn key(&self, name: &str) -> String {
        self.store.key(&["approvals", name])
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A standing answer in Redis: `always` (deny wins, as in `approvals.toml`), then
    /// `run`.
    pub async fn standing(&self, dest: &Destination) -> Result<Option<Verdict>, Unavailable> {
        let (always, run) = (self.key("always"), self.key("run"));
        let member = dest.authority();
        let (table, allowed): (HashMap<String, String>, bool) = self
            .store
            .run("approvals_standing", |mut c| async move {
                redis::pipe().hgetall(always).sismember(run, member).query_async(&mut c).await
            })
            .await?;
        let mut standing = Standing::default();
        for (host, answer) in table {
            let Ok(p) = Pattern::parse(&host) else {
                tracing::warn!("shared approvals: {host:?} is not a host pattern; ignored");
                continue;
            };
            match answer.as_str() {
                "deny" => standing.deny.push(p),
                _ => standing.allow.push(p),
            }
        }
        Ok(standing.verdict(dest).or(allowed.then_some(Verdict::Allowed)))
    }

    /// Wait on the approval pending for `asking.dest` on any replica, opening one (with
    /// `timeout` as its deadline) if there is none.
    pub async fn join(&self, asking: &Asking, timeout: Duration) -> Result<Joined, Unavailable> {
        let info = asking.pending(crate::approvals::new_id(), 0);
        let mut inv = self.join.prepare_invoke();
        inv.key(self.key("pending")).key(self.key("version"));
        inv.arg(asking.dest.authority()).arg(self.key("entry:")).arg(&info.id);
        inv.arg(serde_json::to_string(&info).unwrap_or_default());
        inv.arg(timeout.as_millis().max(1) as u64).arg(file::pattern_for(&asking.dest));
        let (opened, id, left): (i64, String, u64) =
            self.store.run("approvals_join", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        let left = Duration::from_millis(left);
        let deadline = Instant::now() + left;
        let answer = self
            .waiters()
            .entry(id.clone())
            .or_insert_with(|| Waiting { tx: watch::channel(None).0, deadline })
            .tx
            .subscribe();
        Ok(Joined { id, opened: opened == 1, answer, left })
    }

    /// A person's answer: recorded (and `run`/`always` kept) in one step, then this
    /// replica's waiters released; the others' find it on their next poll.
    pub async fn decide(
        &self,
        id: &str,
        choice: Choice,
        scope: Scope,
    ) -> Result<Result<Pending, DecideError>, Unavailable> {
        let verdict = if choice == Choice::Allow { Verdict::Allowed } else { Verdict::Denied };
        let run = choice == Choice::Allow && scope != Scope::Once;
        let always = match (scope, choice) {
            (Scope::Always, Choice::Allow) => "allow",
            (Scope::Always, Choice::Deny) => "deny",
            _ => "",
        };
        let mut inv = self.decide.prepare_invoke();
        inv.key(self.key("pending")).key(self.key("version")).key(self.key("run")).key(self.key("always"));
        inv.arg(self.key("entry:")).arg(self.key("decided:")).arg(id).arg(verdict_text(verdict));
        inv.arg(if run { "1" } else { "0" }).arg(always).arg(RUN_TTL.as_millis() as u64).arg(DECIDED_TTL);
        let found: Option<(String, usize)> =
            self.store.run("approvals_decide", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        let Some((info, waiting)) = found else { return Ok(Err(DecideError::Unknown(id.to_string()))) };
        self.release(id, verdict);
        // Written by a replica of this version: it parses (else: as if gone).
        let Ok(mut p) = serde_json::from_str::<Pending>(&info) else {
            return Ok(Err(DecideError::Unknown(id.to_string())));
        };
        p.waiting = waiting;
        Ok(Ok(p))
    }

    /// The deadline passed for a waiter of `id`: the answer if one was recorded just
    /// before, else unanswered (and nobody can answer it any more).
    pub async fn expire(&self, id: &str) -> Verdict {
        let mut inv = self.expire.prepare_invoke();
        inv.key(self.key("pending")).key(self.key("version"));
        inv.arg(self.key("entry:")).arg(self.key("decided:")).arg(id).arg(DECIDED_TTL);
        let said: Result<String, Unavailable> =
            self.store.run("approvals_expire", |mut c| async move { inv.invoke_async(&mut c).await }).await;
        let verdict = said.ok().and_then(|s| parse_verdict(&s)).unwrap_or(Verdict::Unanswered);
        self.release(id, verdict);
        verdict
    }

    /// Every approval pending on any replica.
    pub async fn pending(&self) -> Result<Vec<Pending>, Unavailable> {
        let mut inv = self.list.prepare_invoke();
        inv.key(self.key("pending")).arg(self.key("entry:"));
        let all: Vec<(String, usize)> =
            self.store.run("approvals_list", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        let mut list: Vec<Pending> = all
            .into_iter()
            .filter_map(|(info, waiting)| {
                let mut p: Pending = serde_json::from_str(&info).ok()?;
                p.waiting = waiting;
                Some(p)
            })
            .collect();
        list.sort_by(|a, b| a.since.cmp(&b.since).then(a.id.cmp(&b.id)));
        Ok(list)
    }

    /// Release this replica's waiters of `id`, if it has any.
    fn release(&self, id: &str, verdict: Verdict) {
        if let Some(w) = self.waiters().remove(id) {
            w.tx.send_replace(Some(verdict));
        }
    }

    /// Keep this replica in step, for as long as it lives: answers given elsewhere
    /// released here (every [`POLL`] while it holds requests), the live view told when
    /// the shared pending list changed (while someone watches it), `run` answers renewed.
    pub fn watch(self: &Arc<Self>, changed: watch::Sender<u64>) {
        let weak: Weak<SharedApprovals> = Arc::downgrade(self);
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut version, mut ticks) = (None, 0u64);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                if ticks % (RUN_RENEW.as_millis() / POLL.as_millis()) as u64 == 0 {
                    shared.renew_run().await;
                }
                ticks += 1;
                let ids = shared.live_ids();
                if ids.is_empty() && changed.receiver_count() == 0 {
                    // Nobody to tell: the next watcher starts from a fresh read.
                    version = None;
                    continue;
                }
                let Ok((now, answers)) = shared.poll(&ids).await else { continue };
                for (id, answer) in ids.iter().zip(answers) {
                    if let Some(v) = answer.as_deref().and_then(parse_verdict) {
                        shared.release(id, v);
                    }
                }
                // Also on the first read: a watcher may have read the list just before
                // the change this version counts.
                if version != Some(now) {
                    changed.send_modify(|n| *n += 1);
                }
                version = Some(now);
            }
        });
    }

    /// The approvals this replica waits on. Those whose waiters all went away before
    /// the deadline (clients that gave up) are dropped a little after it.
    fn live_ids(&self) -> Vec<String> {
        let late = Instant::now().checked_sub(Duration::from_secs(2));
        let mut waiters = self.waiters();
        waiters.retain(|_, w| late.is_none_or(|late| w.deadline > late));
        waiters.keys().cloned().collect()
    }

    /// The pending list's version and the answers recorded for `ids`.
    async fn poll(&self, ids: &[String]) -> Result<(u64, Vec<Option<String>>), Unavailable> {
        let version = self.key("version");
        let keys: Vec<String> = ids.iter().map(|id| self.key(&format!("decided:{id}"))).collect();
        self.store
            .run("approvals_poll", |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.get(version);
                if keys.is_empty() {
                    let (v,): (Option<u64>,) = pipe.query_async(&mut c).await?;
                    return Ok((v.unwrap_or(0), vec![]));
                }
                pipe.mget(keys);
                let (v, answers): (Option<u64>, Vec<Option<String>>) = pipe.query_async(&mut c).await?;
                Ok((v.unwrap_or(0), answers))
            })
            .await
    }

    /// A live replica keeps the `run` answers from lapsing.
    async fn renew_run(&self) {
        let run = self.key("run");
        let ms = RUN_TTL.as_millis() as i64;
        let _: Result<bool, Unavailable> = self
            .store
            .run("approvals_renew", |mut c| async move {
                redis::cmd("PEXPIRE").arg(run).arg(ms).query_async(&mut c).await
            })
            .await;
    }
}

fn verdict_text(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "allowed",
        Verdict::Denied => "denied",
        Verdict::Unanswered | Verdict::Unasked => "unanswered",
    }
}

fn parse_verdict(s: &str) -> Option<Verdict> {
    match s {
        "allowed" => Some(Verdict::Allowed),
        "denied" => Some(Verdict::Denied),
        "unanswered" => Some(Verdict::Unanswered),
        _ => None,
    }
}

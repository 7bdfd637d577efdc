//! Token revocations shared by replicas: a Redis set of revocation ids
//! (`PREFIX:revoked`), added to by `latchkey token revoke` and read by every replica
//! every [`POLL`] into its token state, beside the `revoked` file.
//!
//! Staleness is bounded: a revocation reaches every replica within `POLL` plus one
//! Redis time limit. If the set cannot be read for longer than [`STALE`], a replica
//! with `on_store_error = "closed"` refuses every token (revocation unknown) until it
//! can (503 `shared-state`, like a shared limit); with `"open"` it keeps the last list
//! it read.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use super::OnStoreError;
use super::store::{Store, Unavailable};
use crate::token::Revoked;
use crate::token::state::TokenState;

/// How often each replica reads the shared set.
pub const POLL: Duration = Duration::from_secs(1);

/// How old the last good read may get before a closed store refuses tokens.
pub const STALE: Duration = Duration::from_secs(3);

fn key(store: &Store) -> String {
    store.key(&["revoked"])
}

/// Add one (normalised) id to the shared set; false when it was there already.
pub async fn add(store: &Store, id: &str) -> Result<bool, Unavailable> {
    let (k, id) = (key(store), id.to_string());
    let added: i64 = store.run("revoke", |mut c| async move { c.sadd(k, id).await }).await?;
    Ok(added > 0)
}

/// The shared set now.
pub async fn read(store: &Store) -> Result<Revoked, Unavailable> {
    let k = key(store);
    let ids: Vec<String> = store.run("revoked", |mut c| async move { c.smembers(k).await }).await?;
    let mut set = std::collections::HashSet::new();
    for raw in ids {
        match crate::token::keys::normalise_id(&raw) {
            Ok(id) => {
                set.insert(id);
            }
            // It can match no token: a stray entry someone else wrote.
            Err(why) => tracing::warn!("shared revocation set: {why}; ignored"),
        }
    }
    Ok(Revoked(set))
}

/// Keep `tokens`' shared list current, for as long as it lives.
pub fn watch(store: Arc<Store>, tokens: &Arc<TokenState>) {
    let closed = store.settings().on_store_error == OnStoreError::Closed;
    if closed {
        // Until the first read, a revoked token must not pass.
        tokens.set_shared_revoked(Err(unknown(&store)));
    } else {
        tokens.set_shared_revoked(Ok(Arc::default()));
    }
    let weak: Weak<TokenState> = Arc::downgrade(tokens);
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    rt.spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ok = Instant::now();
        loop {
            tick.tick().await;
            let Some(tokens) = weak.upgrade() else { return };
            match read(&store).await {
                Ok(set) => {
                    last_ok = Instant::now();
                    tokens.set_shared_revoked(Ok(Arc::new(set)));
                }
                Err(Unavailable) if closed && last_ok.elapsed() > STALE => {
                    tokens.set_shared_revoked(Err(unknown(&store)));
                }
                Err(Unavailable) => {}
            }
        }
    });
}

fn unknown(store: &Store) -> String {
    format!(
        "{}: the token revocation set in Redis at {} cannot be read; nothing was sent, retry shortly",
        crate::token::SHARED_UNAVAILABLE,
        store.server()
    )
}

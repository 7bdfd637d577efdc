//! Connection slots: a client connection's place under the global and per-client
//! connection limits (and in the connection gauge), and the open-file budget they need.

use std::net::SocketAddr;
use std::sync::Arc;

use super::Proxy;

/// A client connection's place under the global and per-client limits, and in the
/// connection gauge. It lives as long as the connection — including the tunnel a CONNECT
/// turns it into, which takes it over — so tunnels count against the limits too.
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _per_client: PerClient,
    gauge: prometheus_client::metrics::gauge::Gauge,
    /// The connection's count on its shard, which goes where the slot goes.
    _seat: Option<super::shards::Seat>,
}

/// The slot of a connection still being served as HTTP; a CONNECT takes it.
pub type HeldSlot = Arc<std::sync::Mutex<Option<Slot>>>;

impl Slot {
    fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        per_client: PerClient,
        gauge: &prometheus_client::metrics::gauge::Gauge,
    ) -> Slot {
        gauge.inc();
        Slot { _permit: permit, _per_client: per_client, gauge: gauge.clone(), _seat: None }
    }

    /// The slot with the connection's seat on its shard, to be let go together.
    pub fn seated(mut self, seat: super::shards::Seat) -> Slot {
        self._seat = Some(seat);
        self
    }

    pub fn take(held: &HeldSlot) -> Option<Slot> {
        held.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// One open connection counted against its client's address; dropping it uncounts it.
struct PerClient {
    map: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PerClient {
    fn enter(
        map: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
        limit: usize,
    ) -> Option<PerClient> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PerClient { map: map.clone(), ip })
    }
}

impl Drop for PerClient {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Proxy {
    /// A place for a new client connection under the global and per-client limits, or
    /// `None` (logged) when it must be refused.
    pub(super) fn admit(&self, peer: SocketAddr) -> Option<Slot> {
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            tracing::warn!("connection limit reached; refusing {peer}");
            return None;
        };
        let limit = self.generation().config.proxy.limits.max_connections_per_client;
        let Some(per_client) = PerClient::enter(&self.per_client, peer.ip(), limit) else {
            tracing::warn!("{} has {limit} connections open; refusing another", peer.ip());
            return None;
        };
        Some(Slot::new(permit, per_client, &self.telemetry.metrics.connections))
    }
}

/// Raise the open-file limit to its hard maximum (as servers do), and warn when the
/// connection limits could still run it out: then the accept loop backs off while
/// descriptors are short, but nobody new gets in meanwhile.
pub(super) fn check_fd_budget(limits: &crate::config::Limits) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    // Each client connection may hold one more descriptor for its tunnel's upstream.
    let needed = 2 * limits.max_connections as u64 + limits.max_upstream_connections as u64 + 64;
    if lim.rlim_cur < needed {
        tracing::warn!(
            "open-file limit {} is below what [proxy.limits] allow ({needed}: 2 x max_connections + max_upstream_connections + 64); lower them or raise the limit (ulimit -n, LimitNOFILE=)",
            lim.rlim_cur
        );
    }
}

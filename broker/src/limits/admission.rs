//! The gate at `accept`: decides, before a byte of the request is read, whether a new
//! socket may become a connection.
//!
//! Every socket counts from `accept` until it closes, handshake included, so silent
//! sockets that never finish a handshake use up their own address's allowance and the
//! global capacity, not somebody else's. Global capacity is `server.max_connections`
//! capped by the open-files limit less `server.fd_reserve`: the reserve keeps the
//! management API, backend calls, storage and the 503 answer itself working when clients
//! hold every other descriptor.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::overload::OutboundBudget;
use super::rate::{Rate, TokenBucket};

/// Limits per client address.
#[derive(Debug, Clone, Copy)]
pub struct PerIpLimits {
    /// Open or opening connections per address (0 = unlimited).
    pub max_connections: usize,
    /// New connections per address; `None` = unlimited.
    pub connects: Option<Rate>,
    /// Resumes per address; `None` = unlimited.
    pub resumes: Option<Rate>,
    /// IPv6 addresses are grouped by this prefix.
    pub ipv6_prefix_len: u8,
}

/// Why a socket was turned away; each maps to the HTTP answer it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("connection limit reached")]
    AtCapacity,
    #[error("server overloaded, try again later")]
    Overloaded,
    #[error("too many connections from this address")]
    TooManyFromAddress,
    #[error("connecting too fast from this address")]
    ConnectRate,
    #[error("resuming too fast")]
    ResumeRate,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Self::AtCapacity | Self::Overloaded => 503,
            Self::TooManyFromAddress | Self::ConnectRate | Self::ResumeRate => 429,
        }
    }

    /// The `result` label of `switchboard_connections_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::AtCapacity => "over_capacity",
            Self::Overloaded => "overloaded",
            Self::TooManyFromAddress => "ip_limit",
            Self::ConnectRate => "ip_rate",
            Self::ResumeRate => "resume_rate",
        }
    }
}

/// What is remembered about one client address (or IPv6 prefix).
#[derive(Debug)]
struct AddressState {
    open: usize,
    connects: Option<TokenBucket>,
    resumes: Option<TokenBucket>,
}

impl AddressState {
    fn new(limits: PerIpLimits, now: Instant) -> Self {
        Self {
            open: 0,
            connects: limits.connects.map(|rate| TokenBucket::new(rate, now)),
            resumes: limits.resumes.map(|rate| TokenBucket::new(rate, now)),
        }
    }
}

/// Shared by every shard: one lock per connect and per close, never per message.
#[derive(Debug)]
pub struct Admission {
    capacity: usize,
    open: AtomicUsize,
    per_ip: PerIpLimits,
    addresses: Mutex<HashMap<IpAddr, AddressState>>,
    budget: Arc<OutboundBudget>,
}

impl Admission {
    /// `capacity`: the most sockets open at once (see the module doc).
    pub fn new(capacity: usize, per_ip: PerIpLimits, budget: Arc<OutboundBudget>) -> Self {
        Self {
            capacity,
            open: AtomicUsize::new(0),
            per_ip,
            addresses: Mutex::new(HashMap::new()),
            budget,
        }
    }

    /// The most sockets open at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The capacity from `server.max_connections`, the open-files limit and the reserve.
    pub fn capacity_for(max_connections: usize, open_files: u64, fd_reserve: usize) -> usize {
        let usable = usize::try_from(open_files)
            .unwrap_or(usize::MAX)
            .saturating_sub(fd_reserve);
        max_connections.min(usable)
    }

    /// Sockets open now (connections and handshakes).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Admits a socket from `ip`; the ticket must live as long as the socket.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<AdmissionTicket, Refusal> {
        if self.budget.is_over() {
            return Err(Refusal::Overloaded);
        }
        let opened = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.capacity).then_some(open + 1)
            });
        if opened.is_err() {
            return Err(Refusal::AtCapacity);
        }
        let key = self.address_key(ip);
        if let Err(refusal) = self.admit_address(key, now) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(refusal);
        }
        Ok(AdmissionTicket {
            admission: self.clone(),
            address: key,
        })
    }

    fn admit_address(&self, key: IpAddr, now: Instant) -> Result<(), Refusal> {
        let limits = self.per_ip;
        if limits.max_connections == 0 && limits.connects.is_none() {
            return Ok(());
        }
        self.at_address(key, now, |state| {
            if limits.max_connections != 0 && state.open >= limits.max_connections {
                return Err(Refusal::TooManyFromAddress);
            }
            if let Some(bucket) = state.connects.as_mut() {
                bucket.try_take(1, now).map_err(|_| Refusal::ConnectRate)?;
            }
            state.open += 1;
            Ok(())
        })
    }

    /// Runs `f` on what is remembered about the address `key`, under the lock.
    fn at_address<T>(
        &self,
        key: IpAddr,
        now: Instant,
        f: impl FnOnce(&mut AddressState) -> T,
    ) -> T {
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(addresses
            .entry(key)
            .or_insert_with(|| AddressState::new(self.per_ip, now)))
    }

    fn release(&self, key: IpAddr) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = addresses.get_mut(&key) {
            state.open = state.open.saturating_sub(1);
        }
    }

    /// Charges a resume to `ip`'s resume rate (`limits.resumes_per_sec_per_ip`).
    pub fn admit_resume(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let Some(rate) = self.per_ip.resumes else {
            return Ok(());
        };
        self.at_address(self.address_key(ip), now, |state| {
            let bucket = state
                .resumes
                .get_or_insert_with(|| TokenBucket::new(rate, now));
            bucket.try_take(1, now).map_err(|_| Refusal::ResumeRate)
        })
    }

    /// Whether `ip` has used up its connect rate for now: a caller that can ask the client
    /// to come back cheaply (a QUIC Retry) does so instead of starting work that the gate
    /// would refuse at its end. Nothing is charged.
    pub fn connect_rate_exhausted(&self, ip: IpAddr, now: Instant) -> bool {
        let key = self.address_key(ip);
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        addresses
            .get_mut(&key)
            .and_then(|state| state.connects.as_mut())
            .is_some_and(|bucket| !bucket.wait_for(1, now).is_zero())
    }

    /// Forgets addresses with nothing open and a full connect bucket: the table holds
    /// only addresses that are connected or connected lately.
    pub fn forget_idle_addresses(&self, now: Instant) {
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        addresses.retain(|_, state| {
            state.open > 0
                || state.connects.as_mut().is_some_and(|b| !b.is_full(now))
                || state.resumes.as_mut().is_some_and(|b| !b.is_full(now))
        });
        if addresses.capacity() > 4 * addresses.len().max(64) {
            addresses.shrink_to_fit();
        }
    }

    /// The key an address is counted under: itself, or its IPv6 prefix.
    pub fn address_key(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u128::from(v6);
                    let prefix = u32::from(self.per_ip.ipv6_prefix_len.min(128));
                    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                    IpAddr::V6((bits & mask).into())
                }
            },
        }
    }
}

/// One admitted socket's place under the limits; dropping it gives the place back.
#[derive(Debug)]
pub struct AdmissionTicket {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        self.admission.release(self.address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admission(capacity: usize, per_ip: usize, connects: Option<Rate>) -> Arc<Admission> {
        let limits = PerIpLimits {
            resumes: None,
            max_connections: per_ip,
            connects,
            ipv6_prefix_len: 64,
        };
        Arc::new(Admission::new(
            capacity,
            limits,
            Arc::new(OutboundBudget::new(1 << 20)),
        ))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn per_address_limit_trips_and_resets() {
        let gate = admission(100, 2, None);
        let now = Instant::now();
        let a = gate.admit(ip("10.0.0.1"), now).unwrap();
        let _b = gate.admit(ip("10.0.0.1"), now).unwrap();
        assert_eq!(
            gate.admit(ip("10.0.0.1"), now).unwrap_err(),
            Refusal::TooManyFromAddress
        );
        assert!(gate.admit(ip("10.0.0.2"), now).is_ok());
        drop(a);
        assert!(gate.admit(ip("10.0.0.1"), now).is_ok());
    }

    #[test]
    fn capacity_counts_every_open_socket() {
        let gate = admission(2, 0, None);
        let now = Instant::now();
        let a = gate.admit(ip("10.0.0.1"), now).unwrap();
        let _b = gate.admit(ip("10.0.0.2"), now).unwrap();
        assert_eq!(
            gate.admit(ip("10.0.0.3"), now).unwrap_err(),
            Refusal::AtCapacity
        );
        assert_eq!(gate.open(), 2);
        drop(a);
        assert!(gate.admit(ip("10.0.0.3"), now).is_ok());
    }

    #[test]
    fn connect_rate_refills() {
        let rate = Rate {
            per_sec: 1,
            burst: 2,
        };
        let gate = admission(100, 0, Some(rate));
        let now = Instant::now();
        let _a = gate.admit(ip("10.0.0.1"), now).unwrap();
        let _b = gate.admit(ip("10.0.0.1"), now).unwrap();
        assert_eq!(
            gate.admit(ip("10.0.0.1"), now).unwrap_err(),
            Refusal::ConnectRate
        );
        // A refused socket holds no capacity.
        assert_eq!(gate.open(), 2);
        assert!(
            gate.admit(ip("10.0.0.1"), now + Duration::from_secs(1))
                .is_ok()
        );
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_v4_as_v4() {
        let gate = admission(100, 1, None);
        let now = Instant::now();
        let _a = gate.admit(ip("2001:db8:1:2::1"), now).unwrap();
        assert!(gate.admit(ip("2001:db8:1:2::ffff"), now).is_err());
        assert!(gate.admit(ip("2001:db8:1:3::1"), now).is_ok());
        let _v4 = gate.admit(ip("10.1.1.1"), now).unwrap();
        assert!(gate.admit(ip("::ffff:10.1.1.1"), now).is_err());
    }

    #[test]
    fn idle_addresses_are_forgotten() {
        let rate = Rate {
            per_sec: 10,
            burst: 10,
        };
        let gate = admission(100, 5, Some(rate));
        let now = Instant::now();
        drop(gate.admit(ip("10.0.0.1"), now).unwrap());
        let kept = gate.admit(ip("10.0.0.2"), now).unwrap();
        gate.forget_idle_addresses(now + Duration::from_secs(5));
        let addresses = gate.addresses.lock().unwrap();
        assert_eq!(addresses.len(), 1);
        assert!(addresses.contains_key(&ip("10.0.0.2")));
        drop(addresses);
        drop(kept);
    }

    #[test]
    fn capacity_keeps_the_reserve() {
        assert_eq!(Admission::capacity_for(100_000, 20_000, 1024), 18_976);
        assert_eq!(Admission::capacity_for(50, 20_000, 1024), 50);
        assert_eq!(Admission::capacity_for(50, 100, 1024), 0);
    }
}

//! The PROXY protocol, version 2: how a load balancer in front of the gateway (HAProxy's
//! `send-proxy-v2`, AWS NLB, Envoy) tells it who the client is.
//!
//! Behind a proxy every socket comes from the proxy's address, so per-address limits would
//! either lump every client together or have to be switched off. A connection from one of
//! `server.trusted_proxies` must instead begin with this binary header, and the address it
//! names is the client's for everything that follows: admission, limits, `sourceIp`. A
//! header from anyone else is not trusted (it is not even looked for), and a trusted proxy
//! that sends none is refused, so a misconfiguration is loud.
//!
//! This module is the pure part: the address ranges and the header's decoding.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The header's first 12 bytes.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol and length.
pub const FIXED_LEN: usize = 16;
/// The most a header may declare after its fixed part (addresses and TLVs): more is not a
/// proxy's header.
pub const MAX_BODY_LEN: usize = 512;

/// An address range: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDRESS` or `ADDRESS/PREFIX`.
    pub fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix.parse::<u8>().ok()?)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().ok()?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self { network, prefix })
    }

    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => prefix_eq(
                u32::from(network).into(),
                u32::from(ip).into(),
                32,
                self.prefix,
            ),
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(network), u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, bits: u32, prefix: u8) -> bool {
    let shift = bits - u32::from(prefix);
    a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0)
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol v2 header from a trusted proxy")]
    Missing,
    #[error("unsupported PROXY protocol version or command")]
    Unsupported,
    #[error("PROXY protocol header too long")]
    TooLong,
    #[error("PROXY protocol header addresses truncated")]
    Truncated,
}

/// What the fixed part says: how many bytes follow, and whether the proxy speaks for a
/// client (`PROXY`) or for itself (`LOCAL`, its health checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    pub body_len: usize,
    local: bool,
    family: u8,
}

/// Decodes the fixed 16 bytes.
pub fn decode_fixed(bytes: &[u8; FIXED_LEN]) -> Result<Fixed, ProxyHeaderError> {
    if bytes[..12] != SIGNATURE {
        return Err(ProxyHeaderError::Missing);
    }
    let local = match bytes[12] {
        0x20 => true,
        0x21 => false,
        _ => return Err(ProxyHeaderError::Unsupported),
    };
    let body_len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if body_len > MAX_BODY_LEN {
        return Err(ProxyHeaderError::TooLong);
    }
    Ok(Fixed {
        body_len,
        local,
        family: bytes[13],
    })
}

/// The client address the header names, from the bytes after the fixed part; `None` when
/// it names none (a `LOCAL` health check, or a family other than TCP over IPv4/IPv6): the
/// connection is then the proxy's own.
pub fn client_address(fixed: Fixed, body: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if fixed.local {
        return Ok(None);
    }
    let address = match fixed.family {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            let fields = body.get(..12).ok_or(ProxyHeaderError::Truncated)?;
            let ip = Ipv4Addr::new(fields[0], fields[1], fields[2], fields[3]);
            let port = u16::from_be_bytes([fields[8], fields[9]]);
            SocketAddr::new(IpAddr::V4(ip), port)
        }
        // TCP over IPv6.
        0x21 => {
            let fields = body.get(..36).ok_or(ProxyHeaderError::Truncated)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&fields[..16]);
            let port = u16::from_be_bytes([fields[32], fields[33]]);
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)).to_canonical(), port)
        }
        _ => return Ok(None),
    };
    Ok(Some(address))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend([command, family]);
        bytes.extend((body.len() as u16).to_be_bytes());
        bytes.extend(body);
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
        let fixed = decode_fixed(bytes[..FIXED_LEN].try_into().unwrap())?;
        client_address(fixed, &bytes[FIXED_LEN..FIXED_LEN + fixed.body_len])
    }

    #[test]
    fn ranges_hold_what_they_should() {
        let private = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(private.contains("10.1.2.3".parse().unwrap()));
        assert!(private.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!private.contains("11.0.0.1".parse().unwrap()));
        let one = Cidr::parse("192.168.1.7").unwrap();
        assert!(one.contains("192.168.1.7".parse().unwrap()));
        assert!(!one.contains("192.168.1.8".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn headers_name_the_client() {
        let v4 = header(
            0x21,
            0x11,
            &[203, 0, 113, 7, 10, 0, 0, 1, 0x1f, 0x90, 0x1f, 0x90],
        );
        assert_eq!(decode(&v4), Ok(Some("203.0.113.7:8080".parse().unwrap())));
        let mut body = vec![0u8; 36];
        body[..16].copy_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().unwrap().octets());
        body[32..34].copy_from_slice(&443u16.to_be_bytes());
        body.extend([0x04, 0x00, 0x01, 0xff]); // a TLV after the addresses is skipped
        assert_eq!(
            decode(&header(0x21, 0x21, &body)),
            Ok(Some("[2001:db8::5]:443".parse().unwrap()))
        );
        assert_eq!(decode(&header(0x20, 0x00, &[])), Ok(None), "LOCAL");
    }

    #[test]
    fn anything_else_is_refused() {
        let mut http = b"GET / HTTP/1.1\r\nHost".to_vec();
        http.resize(FIXED_LEN, 0);
        assert_eq!(decode(&http), Err(ProxyHeaderError::Missing));
        assert_eq!(
            decode(&header(0x11, 0x11, &[0; 12])),
            Err(ProxyHeaderError::Unsupported)
        );
        assert_eq!(
            decode(&header(0x21, 0x11, &[0; 4])),
            Err(ProxyHeaderError::Truncated)
        );
        let mut long = header(0x21, 0x11, &[]);
        long[14..16].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(
            decode_fixed(long[..FIXED_LEN].try_into().unwrap()),
            Err(ProxyHeaderError::TooLong)
        );
    }
}

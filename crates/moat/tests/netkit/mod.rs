//! Shared pieces of moat's network tests (attack suite N1–N10 and real
//! clients): sandboxes started through the real `moat` CLI or through the
//! libraries with a door of the test's own, servers on this machine that log
//! everything reaching them, and readers for the door's audit records.
//!
//! Rule of these tests: traffic goes only to servers they start themselves, on
//! loopback, on this machine's own addresses, or in network namespaces they
//! create. A leak is observed at such a server: it records every connection,
//! datagram or echo request, and `sync` makes sure everything sent before it
//! has been recorded before a test looks.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use moat_policy::BackendKind;
use serde_json::Value;

pub mod resolver;

/// The Python helpers copied into every sandbox's workspace.
const PROBE_PY: &str = include_str!("probe.py");
/// The HTTPS (and git smart-HTTP) test server, run on the host.
const TLS_SERVER_PY: &str = include_str!("tls_server.py");

/// How long a test waits for a server or a record that must come.
pub const WAIT: Duration = Duration::from_secs(10);

/// A scratch directory for one test binary, world-traversable (sandbox uids
/// reach their workspaces below it).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("moat-net-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        d
    })
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory below `scratch()`, mode 0711, and a number unique in
/// this test binary.
pub fn fresh_dir(name: &str) -> (PathBuf, u32) {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let d = scratch().join(format!("{name}-{n}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    (d, n)
}

/// A random hex string (markers and secrets that must not show up anywhere).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Bwrap,
    Gvisor,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Bwrap => "bwrap",
            Backend::Gvisor => "gvisor",
        }
    }
    pub fn kind(self) -> BackendKind {
        match self {
            Backend::Bwrap => BackendKind::Bwrap,
            Backend::Gvisor => BackendKind::Gvisor,
        }
    }
    /// Whether the backend's runtime is installed; a missing one fails the
    /// test when MOAT_TEST_REQUIRE_ALL is set (CI), else skips it.
    pub fn available(self) -> bool {
        let bin = match self {
            Backend::Bwrap => "bwrap",
            Backend::Gvisor => "runsc",
        };
        let found = Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found && std::env::var_os("MOAT_TEST_REQUIRE_ALL").is_some() {
            panic!("{bin} is required (MOAT_TEST_REQUIRE_ALL is set) but not installed");
        }
        found
    }
}

/// One test per backend from a body taking the backend:
/// `net_tests! { attack_n1_x => |b: Backend| { ... }; }` gives `bwrap::attack_n1_x`
/// and `gvisor::attack_n1_x`.
#[macro_export]
macro_rules! net_tests {
    ($($name:ident => $body:expr;)*) => {
        mod bwrap {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let b = $crate::netkit::Backend::Bwrap;
                    if !b.available() { return; }
                    ($body)(b)
                }
            )*
        }
        mod gvisor {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let b = $crate::netkit::Backend::Gvisor;
                    if !b.available() { return; }
                    ($body)(b)
                }
            )*
        }
    };
}

/// This machine's own global addresses (not loopback): a test may serve on
/// them, and a sandbox must not reach them.
pub fn host_addrs() -> Vec<IpAddr> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "scope", "global"])
        .output()
        .expect("ip addr");
    let mut addrs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.contains("tentative") || line.contains("dadfailed") {
            continue; // not bindable yet
        }
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == "inet" || w == "inet6" {
                if let Some(a) = words.next().and_then(|c| c.split('/').next()) {
                    if let Ok(ip) = a.parse::<IpAddr>() {
                        addrs.push(ip);
                    }
                }
            }
        }
    }
    addrs
}

/// `host_addrs()`, for the legs that test reaching them: at least one IPv4
/// one must exist, or those legs would test nothing.
pub fn require_host_addrs() -> Vec<IpAddr> {
    let a = host_addrs();
    assert!(
        a.iter().any(|a| a.is_ipv4()),
        "this machine has no global IPv4 address (`ip -o addr show scope global`: {a:?}); \
         the host-address legs of N1, N4 and N10 need one to try to reach"
    );
    a
}

pub fn loopbacks() -> Vec<IpAddr> {
    vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()]
}

/// Loopback and this machine's own addresses.
pub fn local_addrs() -> Vec<IpAddr> {
    let mut a = loopbacks();
    a.extend(host_addrs());
    a
}

/// `[v6]` or `v4`, as a URL host.
pub fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

// ---------------------------------------------------------------------------
// Network namespaces the tests create
// ---------------------------------------------------------------------------

/// A network namespace of the test's own ("the outside" for library doors):
/// loopback up, extra addresses on it, no other interface. Nothing sent to it
/// leaves this machine.
#[derive(Clone)]
pub struct Netns(pub Arc<OwnedFd>);

impl Netns {
    /// A new namespace whose loopback also carries `addrs` (CIDR, e.g.
    /// `10.0.0.1/32`, `fc00::1/128`). `optional` addresses may fail to be added.
    pub fn new(addrs: &[&str], optional: &[&str]) -> Netns {
        let addrs: Vec<String> = addrs.iter().map(|s| s.to_string()).collect();
        let optional: Vec<String> = optional.iter().map(|s| s.to_string()).collect();
        let (fd, ()) = moat_egress::netns::with_new_netns(move || {
            // A child forked from this thread lives in this namespace.
            for (a, must) in addrs
                .iter()
                .map(|a| (a, true))
                .chain(optional.iter().map(|a| (a, false)))
            {
                let st = Command::new("ip")
                    .args(["addr", "add", a, "dev", "lo"])
                    .stderr(Stdio::null())
                    .status()?;
                if must && !st.success() {
                    return Err(std::io::Error::other(format!("ip addr add {a} failed")));
                }
            }
            Ok(())
        })
        .expect("creating the test's outside namespace");
        Netns(Arc::new(fd))
    }

    pub fn from_fd(fd: Arc<OwnedFd>) -> Netns {
        Netns(fd)
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        moat_egress::netns::in_netns(&self.0, f)
    }

    /// The namespace's inode (to tell namespaces apart).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let f = std::fs::File::from(self.0.try_clone().unwrap());
        f.metadata().unwrap().ino()
    }
}

/// Waits until nothing accepts TCP connections on `addr` inside `ns`.
pub fn wait_refused(ns: &Netns, addr: SocketAddr) {
    let start = Instant::now();
    loop {
        let r = ns
            .run(move || Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(1))))
            .unwrap();
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => {}
        }
        assert!(
            start.elapsed() < WAIT,
            "{addr} still accepts connections: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Logging servers
// ---------------------------------------------------------------------------

/// One TCP connection that reached a test server, and what it sent.
#[derive(Debug, Clone)]
pub struct Hit {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Every byte received on the connection, until it closed.
    pub data: Vec<u8>,
    /// The connection is over (`data` is complete).
    pub done: bool,
}

impl Hit {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
    /// The request line, if the connection carried HTTP.
    pub fn request_line(&self) -> String {
        self.text().lines().next().unwrap_or("").to_string()
    }
}

struct Log<T> {
    items: Mutex<Vec<T>>,
    sync_peers: Mutex<HashSet<SocketAddr>>,
    cv: Condvar,
}

impl<T> Default for Log<T> {
    fn default() -> Self {
        Log {
            items: Mutex::new(Vec::new()),
            sync_peers: Mutex::new(HashSet::new()),
            cv: Condvar::new(),
        }
    }
}

fn same_peer(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |s: SocketAddr| (moat_policy::network::canonical_ip(s.ip()), s.port());
    canon(a) == canon(b)
}

/// A TCP server that records every connection and answers HTTP requests with
/// `200 upstream-ok <request line>`. Stands for "the outside": anything the
/// door must not let through would arrive here.
pub struct Upstream {
    pub port: u16,
    pub addrs: Vec<SocketAddr>,
    log: Arc<Log<Hit>>,
    ns: Option<Netns>,
}

fn bind_all(ips: &[IpAddr], port: u16) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    let mut port = port;
    for ip in ips {
        let l = TcpListener::bind(SocketAddr::new(*ip, port))?;
        port = l.local_addr()?.port();
        out.push(l);
    }
    Ok(out)
}

impl Upstream {
    /// On loopback and this machine's own addresses, one random port.
    pub fn on_host() -> Upstream {
        Upstream::bind(&local_addrs(), 0, None)
    }

    /// On 127.0.0.1 and ::1 only.
    pub fn loopback() -> Upstream {
        Upstream::bind(&loopbacks(), 0, None)
    }

    /// Binds every address on one port (random if 0) in `ns` (or the host's).
    pub fn bind(ips: &[IpAddr], port: u16, ns: Option<&Netns>) -> Upstream {
        let mut last = None;
        for _ in 0..50 {
            let ips2 = ips.to_vec();
            let r = match ns {
                Some(ns) => ns.run(move || bind_all(&ips2, port)),
                None => bind_all(&ips2, port),
            };
            match r {
                Ok(ls) => return Upstream::serve(ls, ns.cloned()),
                Err(e) if port == 0 && e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
                Err(e) => panic!("binding {ips:?}:{port}: {e}"),
            }
        }
        panic!("no free port for {ips:?}: {last:?}");
    }

    fn serve(listeners: Vec<TcpListener>, ns: Option<Netns>) -> Upstream {
        let log: Arc<Log<Hit>> = Arc::default();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        for l in listeners {
            let log = log.clone();
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(mut s) = s else { continue };
                    let (Ok(local), Ok(peer)) = (s.local_addr(), s.peer_addr()) else {
                        continue;
                    };
                    let idx = {
                        let mut items = log.items.lock().unwrap();
                        items.push(Hit {
                            local,
                            peer,
                            data: Vec::new(),
                            done: false,
                        });
                        items.len() - 1
                    };
                    log.cv.notify_all();
                    let log = log.clone();
                    std::thread::spawn(move || {
                        let data = serve_conn(&mut s);
                        let mut items = log.items.lock().unwrap();
                        items[idx].data = data;
                        items[idx].done = true;
                        drop(items);
                        log.cv.notify_all();
                    });
                }
            });
        }
        Upstream {
            port: addrs[0].port(),
            addrs,
            log,
            ns,
        }
    }

    /// Makes sure every connection made before this call is recorded: one
    /// sentinel connection per listening socket, waited for (each socket's
    /// accept queue is first in, first out).
    pub fn sync(&self) {
        for addr in &self.addrs {
            let mut target = *addr;
            if target.ip().is_unspecified() {
                target.set_ip(match target.ip() {
                    IpAddr::V4(_) => "127.0.0.1".parse().unwrap(),
                    IpAddr::V6(_) => "::1".parse().unwrap(),
                });
            }
            let connect = move || TcpStream::connect_timeout(&target, WAIT);
            let s = match &self.ns {
                Some(ns) => ns.run(connect),
                None => connect(),
            }
            .unwrap_or_else(|e| panic!("sync connection to {target}: {e}"));
            let me = s.local_addr().unwrap();
            self.log.sync_peers.lock().unwrap().insert(me);
            let items = self.log.items.lock().unwrap();
            let (_items, timeout) = self
                .log
                .cv
                .wait_timeout_while(items, WAIT, |items| {
                    !items.iter().any(|h| same_peer(h.peer, me))
                })
                .unwrap();
            assert!(!timeout.timed_out(), "sync connection to {target} not seen");
        }
    }

    /// Every connection so far (after a sync, and once each has closed),
    /// sentinels left out.
    pub fn hits(&self) -> Vec<Hit> {
        self.sync();
        let sync = self.log.sync_peers.lock().unwrap().clone();
        let items = self.log.items.lock().unwrap();
        let (items, t) = self
            .log
            .cv
            .wait_timeout_while(items, WAIT, |items| items.iter().any(|h| !h.done))
            .unwrap();
        assert!(
            !t.timed_out(),
            "a connection to the test server did not end"
        );
        items
            .iter()
            .filter(|h| !sync.iter().any(|s| same_peer(*s, h.peer)))
            .cloned()
            .collect()
    }

    pub fn request_lines(&self) -> Vec<String> {
        self.hits().iter().map(Hit::request_line).collect()
    }

    /// Asserts nothing reached this server.
    pub fn assert_untouched(&self, what: &str) {
        let hits = self.hits();
        assert!(
            hits.is_empty(),
            "{what}: the outside server was reached: {:?}",
            hits.iter()
                .map(|h| (h.local, h.peer, h.request_line()))
                .collect::<Vec<_>>()
        );
    }
}

/// Serves one connection like a lenient HTTP/1.1 server (bare LF line ends
/// accepted, chunked bodies decoded): reads one request, answers
/// `200 upstream-ok <request line>`, closes its sending side, and keeps
/// everything else that arrives until the peer closes. Anything after the
/// first request in the returned bytes is a request the door let through
/// unseen (smuggling). Non-HTTP connections are read until they close.
fn serve_conn(s: &mut TcpStream) -> Vec<u8> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut data: Vec<u8> = Vec::new();
    let more = |s: &mut TcpStream, data: &mut Vec<u8>| -> bool {
        let mut buf = [0u8; 16384];
        match s.read(&mut buf) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                data.len() < 1 << 22
            }
        }
    };
    // The head.
    let head_end = loop {
        if !data.is_empty() && !data[0].is_ascii_uppercase() {
            while more(s, &mut data) {}
            return data;
        }
        if let Some(e) = find(&data, b"\r\n\r\n") {
            break e + 4;
        }
        if let Some(e) = find(&data, b"\n\n") {
            break e + 2;
        }
        if !more(s, &mut data) {
            return data;
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    // The body, as a lenient server frames it.
    let mut pos = head_end;
    if field("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        let line_at = |s: &mut TcpStream, data: &mut Vec<u8>, pos: usize| -> Option<usize> {
            loop {
                if let Some(i) = data[pos..].iter().position(|&b| b == b'\n') {
                    return Some(pos + i + 1);
                }
                if !more(s, data) {
                    return None;
                }
            }
        };
        while let Some(end) = line_at(s, &mut data, pos) {
            let text = String::from_utf8_lossy(&data[pos..end]).into_owned();
            let size =
                usize::from_str_radix(text.trim().split(';').next().unwrap_or("").trim(), 16)
                    .unwrap_or(0);
            pos = end;
            if size == 0 {
                // Trailers up to an empty line.
                while let Some(end) = line_at(s, &mut data, pos) {
                    let empty = data[pos..end].iter().all(|b| *b == b'\r' || *b == b'\n');
                    pos = end;
                    if empty {
                        break;
                    }
                }
                break;
            }
            while data.len() < pos + size {
                if !more(s, &mut data) {
                    break;
                }
            }
            pos = (pos + size).min(data.len());
            // The line end after the data.
            if let Some(end) = line_at(s, &mut data, pos) {
                pos = end;
            }
        }
    } else if let Some(len) = field("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        while data.len() < head_end + len && more(s, &mut data) {}
    }
    let line = String::from_utf8_lossy(&data);
    let line = line.lines().next().unwrap_or("").to_string();
    let body = format!("upstream-ok {line}\n");
    let _ = s.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let _ = s.shutdown(std::net::Shutdown::Write);
    while more(s, &mut data) {}
    data
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One datagram that reached a test UDP server.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub data: Vec<u8>,
}

/// A UDP server that records every datagram.
pub struct UdpLog {
    pub port: u16,
    pub addrs: Vec<SocketAddr>,
    log: Arc<Log<Datagram>>,
}

impl UdpLog {
    pub fn on_host() -> UdpLog {
        UdpLog::bind(&local_addrs(), 0).expect("binding the UDP log")
    }

    pub fn bind(ips: &[IpAddr], port: u16) -> std::io::Result<UdpLog> {
        let mut last = None;
        for _ in 0..50 {
            let mut socks = Vec::new();
            let mut p = port;
            let mut failed = None;
            for ip in ips {
                match UdpSocket::bind(SocketAddr::new(*ip, p)) {
                    Ok(s) => {
                        p = s.local_addr()?.port();
                        socks.push(s);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => return Ok(UdpLog::serve(socks)),
                Some(e) if port == 0 && e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
                Some(e) => return Err(e),
            }
        }
        Err(last.unwrap())
    }

    fn serve(socks: Vec<UdpSocket>) -> UdpLog {
        let log: Arc<Log<Datagram>> = Arc::default();
        let addrs: Vec<SocketAddr> = socks.iter().map(|s| s.local_addr().unwrap()).collect();
        for s in socks {
            let log = log.clone();
            std::thread::spawn(move || {
                let local = s.local_addr().unwrap();
                let mut buf = vec![0u8; 65536];
                while let Ok((n, peer)) = s.recv_from(&mut buf) {
                    log.items.lock().unwrap().push(Datagram {
                        local,
                        peer,
                        data: buf[..n].to_vec(),
                    });
                    log.cv.notify_all();
                }
            });
        }
        UdpLog {
            port: addrs[0].port(),
            addrs,
            log,
        }
    }

    /// Every datagram so far, after one sentinel per socket was seen.
    pub fn datagrams(&self) -> Vec<Datagram> {
        for addr in &self.addrs {
            let any: SocketAddr = match addr {
                SocketAddr::V4(_) => "127.0.0.1:0".parse().unwrap(),
                SocketAddr::V6(_) => "[::1]:0".parse().unwrap(),
            };
            let any = if addr.ip().is_loopback() {
                any
            } else {
                SocketAddr::new(addr.ip(), 0)
            };
            let s = UdpSocket::bind(any).unwrap();
            let me = s.local_addr().unwrap();
            self.log.sync_peers.lock().unwrap().insert(me);
            s.send_to(b"moat-test-sync", addr).unwrap();
            let items = self.log.items.lock().unwrap();
            let (_i, t) = self
                .log
                .cv
                .wait_timeout_while(items, WAIT, |items| {
                    !items.iter().any(|d| same_peer(d.peer, me))
                })
                .unwrap();
            assert!(!t.timed_out(), "UDP sync datagram to {addr} not seen");
        }
        let sync = self.log.sync_peers.lock().unwrap().clone();
        self.log
            .items
            .lock()
            .unwrap()
            .iter()
            .filter(|d| !sync.iter().any(|s| same_peer(*s, d.peer)))
            .cloned()
            .collect()
    }

    pub fn assert_untouched(&self, what: &str) {
        let d = self.datagrams();
        assert!(
            d.is_empty(),
            "{what}: datagrams reached the outside: {:?}",
            d.iter()
                .map(|d| (
                    d.local,
                    d.peer,
                    String::from_utf8_lossy(&d.data).into_owned()
                ))
                .collect::<Vec<_>>()
        );
    }
}

/// Watches the host's ICMP and ICMPv6 traffic (raw sockets; the tests run as
/// root) for echo requests carrying a marker, as `ping -p MARKER` sends.
pub struct IcmpWatch {
    pub marker: Vec<u8>,
    seen: Arc<Log<(u8, Vec<u8>)>>,
}

impl IcmpWatch {
    pub fn start() -> IcmpWatch {
        let marker_hex = random_hex(16);
        let marker: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&marker_hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let seen: Arc<Log<(u8, Vec<u8>)>> = Arc::default();
        for (family, proto, tag) in [
            (libc::AF_INET, libc::IPPROTO_ICMP, 4u8),
            (libc::AF_INET6, libc::IPPROTO_ICMPV6, 6u8),
        ] {
            // SAFETY: a raw socket; the descriptor is owned right below.
            let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
            assert!(
                fd >= 0,
                "raw ICMP socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fresh descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    // SAFETY: recv into our buffer.
                    let n = unsafe {
                        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n < 0 {
                        return;
                    }
                    seen.items
                        .lock()
                        .unwrap()
                        .push((tag, buf[..n as usize].to_vec()));
                    seen.cv.notify_all();
                }
            });
        }
        IcmpWatch { marker, seen }
    }

    /// The pattern argument for `ping -p`.
    pub fn ping_pattern(&self) -> String {
        self.marker.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Packets seen that carry the marker, after a marked sync echo of the
    /// test's own (to 127.0.0.1) was seen.
    pub fn marked(&self) -> Vec<(u8, Vec<u8>)> {
        let mut sync = b"moat-sync-".to_vec();
        sync.extend_from_slice(random_hex(8).as_bytes());
        // SAFETY: a raw ICMP socket used for one echo request.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut pkt = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
        pkt.extend_from_slice(&sync);
        let sum = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sendto with a valid buffer and address.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert!(r >= 0, "sync echo: {}", std::io::Error::last_os_error());
        let items = self.seen.items.lock().unwrap();
        let (items, t) = self
            .seen
            .cv
            .wait_timeout_while(items, WAIT, |items| {
                !items.iter().any(|(_, p)| find(p, &sync).is_some())
            })
            .unwrap();
        assert!(!t.timed_out(), "the ICMP watcher did not see its own echo");
        items
            .iter()
            .filter(|(_, p)| find(p, &self.marker).is_some())
            .cloned()
            .collect()
    }
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A listening unix socket on the host (a path or, with a leading '@', an
/// abstract name) that records every connection.
pub struct UnixLog {
    accepted: Arc<Mutex<u32>>,
    path: Option<PathBuf>,
}

impl UnixLog {
    pub fn bind(name: &str) -> UnixLog {
        use std::os::unix::net::UnixListener;
        let (l, path) = if let Some(abs) = name.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let a = std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes()).unwrap();
            (UnixListener::bind_addr(&a).unwrap(), None)
        } else {
            let _ = std::fs::remove_file(name);
            (UnixListener::bind(name).unwrap(), Some(PathBuf::from(name)))
        };
        if let Some(p) = &path {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let accepted = Arc::new(Mutex::new(0));
        let a = accepted.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                if s.is_ok() {
                    *a.lock().unwrap() += 1;
                }
            }
        });
        UnixLog { accepted, path }
    }

    /// Connections accepted so far (the host's own check connection, made by
    /// `check_reachable`, counts as one).
    pub fn accepted(&self) -> u32 {
        *self.accepted.lock().unwrap()
    }

    /// Proves the socket works from the host, and waits until that
    /// connection was counted.
    pub fn check_reachable(&self, name: &str) {
        use std::os::unix::net::UnixStream;
        let before = self.accepted();
        let _s = if let Some(abs) = name.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let a = std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes()).unwrap();
            UnixStream::connect_addr(&a).unwrap()
        } else {
            UnixStream::connect(name).unwrap()
        };
        let start = Instant::now();
        while self.accepted() == before {
            assert!(start.elapsed() < WAIT, "unix socket {name} never accepted");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for UnixLog {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------------------
// TLS: a test CA and an HTTPS server
// ---------------------------------------------------------------------------

/// A CA and one server certificate for `names`, made with the openssl CLI.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(names: &[&str]) -> Pki {
        let (dir, _) = fresh_dir("pki");
        let run = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=moat test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=moat test server",
        ]);
        let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        std::fs::write(
            dir.join("ext"),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        Pki { dir }
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("ca.pem")).unwrap()
    }
}

/// The Python HTTPS server of `tls_server.py` on 127.0.0.1, and its event log.
pub struct TlsServer {
    pub port: u16,
    child: Child,
    events: Arc<Log<Value>>,
    sync_peers: Mutex<Vec<String>>,
}

impl TlsServer {
    pub fn start(pki: &Pki, git_root: Option<&Path>) -> TlsServer {
        let script = pki.dir.join("tls_server.py");
        std::fs::write(&script, TLS_SERVER_PY).unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg("-u")
            .arg(&script)
            .arg(pki.dir.join("server.pem"))
            .arg(pki.dir.join("server.key"));
        if let Some(g) = git_root {
            cmd.arg(g);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 for the TLS server");
        let out = child.stdout.take().unwrap();
        let events: Arc<Log<Value>> = Arc::default();
        let ev = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    ev.items.lock().unwrap().push(v);
                    ev.cv.notify_all();
                }
            }
        });
        let items = events.items.lock().unwrap();
        let (items, t) = events
            .cv
            .wait_timeout_while(items, WAIT, |i| i.is_empty())
            .unwrap();
        assert!(!t.timed_out(), "the TLS server did not start");
        let port = items[0][1].as_u64().expect("ready line") as u16;
        drop(items);
        TlsServer {
            port,
            child,
            events,
            sync_peers: Mutex::new(Vec::new()),
        }
    }

    fn sync(&self) {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let me = format!("127.0.0.1:{}", s.local_addr().unwrap().port());
        self.sync_peers.lock().unwrap().push(me.clone());
        let items = self.events.items.lock().unwrap();
        let (_i, t) = self
            .events
            .cv
            .wait_timeout_while(items, WAIT, |i| {
                !i.iter().any(|e| e[0] == "conn" && e[1] == me.as_str())
            })
            .unwrap();
        assert!(!t.timed_out(), "TLS server sync connection not seen");
    }

    /// Accepted TCP connections (sentinels left out).
    pub fn conns(&self) -> usize {
        self.sync();
        let sync = self.sync_peers.lock().unwrap().clone();
        self.events
            .items
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e[0] == "conn" && !sync.iter().any(|s| e[1] == s.as_str()))
            .count()
    }

    /// Requests served: (method, path, host).
    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.sync();
        self.events
            .items
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e[0] == "req")
            .map(|e| {
                (
                    e[1].as_str().unwrap_or("").to_string(),
                    e[2].as_str().unwrap_or("").to_string(),
                    e[3].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Audit records
// ---------------------------------------------------------------------------

/// The door's audit records (from `audit.jsonl` or a `MemoryAudit`).
pub struct Audit {
    pub text: String,
    pub records: Vec<Value>,
}

impl Audit {
    pub fn from_text(text: String) -> Audit {
        let records = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record {l}: {e}")))
            .collect();
        Audit { text, records }
    }

    pub fn from_memory(m: &moat_egress::MemoryAudit) -> Audit {
        let mut text = String::new();
        for r in m.snapshot() {
            text.push_str(&serde_json::to_string(&r).unwrap());
            text.push('\n');
        }
        Audit::from_text(text)
    }

    /// Records of `kind` for `host` with `verdict`.
    pub fn find(&self, kind: &str, host: &str, verdict: &str) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| r["kind"] == kind && r["host"] == host && r["verdict"] == verdict)
            .collect()
    }

    /// Asserts a denied record of `kind` for `host` whose reason contains `why`.
    pub fn assert_denied(&self, kind: &str, host: &str, why: &str) {
        let hit = self.find(kind, host, "denied").into_iter().any(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains(why))
        });
        assert!(
            hit,
            "no denied {kind} record for {host:?} with reason containing {why:?}:\n{}",
            self.text
        );
    }

    pub fn assert_allowed(&self, kind: &str, host: &str) {
        assert!(
            !self.find(kind, host, "allowed").is_empty(),
            "no allowed {kind} record for {host:?}:\n{}",
            self.text
        );
    }

    /// Asserts that `needle` (a body or header value sent) appears nowhere.
    pub fn assert_absent(&self, needle: &str) {
        assert!(
            !self.text.contains(needle),
            "the audit log holds {needle:?}:\n{}",
            self.text
        );
    }

    /// Asserts that every record is well formed and has a reason when denied.
    pub fn assert_well_formed(&self) {
        for r in &self.records {
            for k in ["ts_ms", "lease", "kind", "host", "port", "verdict"] {
                assert!(!r[k].is_null(), "record without {k}: {r}");
            }
            if r["verdict"] == "denied" {
                assert!(
                    r["reason"].as_str().is_some_and(|s| !s.is_empty()),
                    "denied without a reason: {r}"
                );
            } else {
                assert_eq!(r["verdict"], "allowed", "{r}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Sandboxes through the CLI
// ---------------------------------------------------------------------------

/// What a sandboxed command printed, and how moat exited.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// The JSON object a Python probe printed last.
    pub fn json(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON from the probe: {self:?}"));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// `name=code` and `name.out=text` lines printed by the shell prelude's `t`.
    pub fn probes(&self) -> Probes {
        let mut m = BTreeMap::new();
        for line in self.stdout.lines() {
            if let Some((k, v)) = line.split_once('=') {
                m.insert(k.to_string(), v.to_string());
            }
        }
        Probes(m, format!("{self:?}"))
    }
}

/// Results of shell probes: exit status and (flattened) output per name.
pub struct Probes(BTreeMap<String, String>, String);

impl Probes {
    pub fn code(&self, name: &str) -> i32 {
        self.0
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no result for {name}: {}", self.1))
    }
    pub fn out(&self, name: &str) -> &str {
        self.0
            .get(&format!("{name}.out"))
            .map(String::as_str)
            .unwrap_or("")
    }
    /// Asserts that `name` failed with `code` (any non-zero if `None`) and
    /// that its output contains `text`.
    pub fn failed(&self, name: &str, code: Option<i32>, text: &str) {
        let c = self.code(name);
        match code {
            Some(want) => assert_eq!(c, want, "{name}: {}", self.out(name)),
            None => assert_ne!(c, 0, "{name} succeeded: {}", self.out(name)),
        }
        assert!(
            self.out(name).contains(text),
            "{name}: output lacks {text:?}: {}",
            self.out(name)
        );
    }
    pub fn succeeded(&self, name: &str, text: &str) {
        assert_eq!(self.code(name), 0, "{name}: {}", self.out(name));
        assert!(
            self.out(name).contains(text),
            "{name}: output lacks {text:?}: {}",
            self.out(name)
        );
    }
}

/// `t NAME CMD...` runs CMD and prints `NAME=<status>` and `NAME.out=<output>`.
pub const SH_PRELUDE: &str = r#"
t() { n=$1; shift; o=$("$@" 2>&1 </dev/null); c=$?; printf '%s=%s\n' "$n" "$c"; printf '%s.out=%s\n' "$n" "$(printf '%s' "$o" | tr '\n\r' '  ' | cut -c1-600)"; }
"#;

/// Asserts one Python probe result failed with `error` (e.g. `ECONNREFUSED`).
pub fn py_failed(r: &Value, label: &str, errors: &[&str]) {
    let v = &r[label];
    assert_eq!(v["ok"], false, "{label} succeeded: {v}");
    let e = v["error"].as_str().unwrap_or("");
    assert!(
        errors.contains(&e),
        "{label}: {e} is not one of {errors:?}: {v}"
    );
}

/// Asserts one Python probe result succeeded and returns its value.
pub fn py_ok<'a>(r: &'a Value, label: &str) -> &'a Value {
    let v = &r[label];
    assert_eq!(v["ok"], true, "{label} failed: {v}");
    &v["value"]
}

/// Asserts a Python probe got an HTTP response with `status` (and for a
/// refusal, a reason containing `why`).
pub fn py_status(r: &Value, label: &str, status: u64, why: &str) {
    let v = py_ok(r, label);
    assert_eq!(v["status"], status, "{label}: {v}");
    if !why.is_empty() {
        assert!(
            v["denied"].as_str().is_some_and(|d| d.contains(why))
                || v["body"].as_str().is_some_and(|d| d.contains(why)),
            "{label}: reason lacks {why:?}: {v}"
        );
    }
}

/// A `moat sandbox run` invocation of one test: its own data directory (so
/// its audit log is its own) and a workspace owned by an unprivileged uid.
pub struct Sandbox {
    pub backend: Backend,
    pub dir: PathBuf,
    pub ws: PathBuf,
    args: Vec<String>,
    /// A resolv.conf the `moat` process's host-side lookups use instead of
    /// the host's (`resolver::TestResolver`).
    resolv_conf: Option<PathBuf>,
}

impl Sandbox {
    pub fn new(backend: Backend, name: &str) -> Sandbox {
        let (dir, n) = fresh_dir(&format!("{name}-{}", backend.name()));
        let ws = dir.join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(ws.join("probe.py"), PROBE_PY).unwrap();
        let uid = 43000 + n;
        std::os::unix::fs::chown(&ws, Some(uid), Some(uid)).unwrap();
        Sandbox {
            backend,
            dir,
            ws,
            args: Vec::new(),
            resolv_conf: None,
        }
    }

    /// Points the door's host-side name lookups at `r`.
    pub fn resolver(&mut self, r: &resolver::TestResolver) -> &mut Self {
        self.resolv_conf = Some(r.resolv_conf.clone());
        self
    }

    pub fn allow(&mut self, entry: &str) -> &mut Self {
        self.args.extend(["--allow-domain".into(), entry.into()]);
        self
    }

    pub fn pin(&mut self, host: &str, ip: &str) -> &mut Self {
        self.args
            .extend(["--resolve".into(), format!("{host}={ip}")]);
        self
    }

    pub fn env(&mut self, k: &str, v: &str) -> &mut Self {
        self.args.extend(["--env".into(), format!("{k}={v}")]);
        self
    }

    /// A file in the workspace (readable by the sandbox).
    pub fn file(&mut self, name: &str, bytes: &[u8]) -> &mut Self {
        std::fs::write(self.ws.join(name), bytes).unwrap();
        self
    }

    /// Trusts `pki`'s CA inside (curl, openssl, python, git, node).
    pub fn trust(&mut self, pki: &Pki) -> &mut Self {
        self.file("ca.pem", &pki.ca_pem());
        self.env("CURL_CA_BUNDLE", "/workspace/ca.pem")
            .env("SSL_CERT_FILE", "/workspace/ca.pem")
            .env("GIT_SSL_CAINFO", "/workspace/ca.pem")
            .env("NODE_EXTRA_CA_CERTS", "/workspace/ca.pem")
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
        c.env("MOAT_DATA_DIR", self.dir.join("data"))
            .env("MOAT_RUNTIME_DIR", self.dir.join("run"))
            .env_remove("MOAT_ALLOW_UNSANDBOXED")
            .env_remove("MOAT_LOG")
            .stdin(Stdio::null())
            .args([
                "sandbox",
                "run",
                "--backend",
                self.backend.name(),
                "--timeout",
                "120s",
            ])
            .arg("--workspace")
            .arg(&self.ws)
            .args(&self.args);
        if let Some(p) = &self.resolv_conf {
            resolver::point(&mut c, p);
        }
        c
    }

    pub fn run_argv(&self, argv: &[&str]) -> Out {
        let o = self
            .command()
            .arg("--")
            .args(argv)
            .output()
            .expect("running moat");
        Out {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Runs a shell script inside (with `t` from `SH_PRELUDE` defined).
    pub fn sh(&self, script: &str) -> Out {
        self.run_argv(&["/bin/sh", "-c", &format!("{SH_PRELUDE}\n{script}")])
    }

    /// Runs a Python probe inside (`from probe import *` is prepended, `done()`
    /// appended) and returns its JSON results.
    pub fn python(&self, code: &str) -> Value {
        let name = format!("t{}.py", COUNTER.fetch_add(1, Ordering::SeqCst));
        std::fs::write(
            self.ws.join(&name),
            format!("from probe import *\n{code}\ndone()\n"),
        )
        .unwrap();
        let out = self.run_argv(&["python3", &format!("/workspace/{name}")]);
        assert_eq!(out.code, Some(0), "probe failed: {out:?}");
        out.json()
    }

    pub fn audit(&self) -> Audit {
        let p = self.dir.join("data").join("audit").join("audit.jsonl");
        Audit::from_text(std::fs::read_to_string(p).unwrap_or_default())
    }

    pub fn audit_exists(&self) -> bool {
        self.dir
            .join("data")
            .join("audit")
            .join("audit.jsonl")
            .exists()
    }
}

// ---------------------------------------------------------------------------
// Sandboxes through the libraries, with a door of the test's own
// ---------------------------------------------------------------------------

/// A current-thread tokio runtime driven by a thread that lives in `ns`: every
/// socket the door opens towards upstreams is created there.
pub struct DoorRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DoorRuntime {
    pub fn start_in(ns: &Netns) -> DoorRuntime {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let fd = ns.0.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a netns descriptor.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            rt.block_on(async {
                let _ = rx.await;
            });
            // Dropping the runtime here cancels every task (the door's too).
        });
        DoorRuntime {
            handle,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Stops the runtime abruptly (as if the door's process part crashed).
    pub fn crash(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for DoorRuntime {
    fn drop(&mut self) {
        self.crash();
    }
}

/// A lease whose network is a `moat_egress::Door` started by the test with a
/// fixed name table, recording into memory.
pub struct LibSandbox {
    pub door: Option<moat_egress::Door>,
    pub door_ns: Netns,
    pub audit: Arc<moat_egress::MemoryAudit>,
    pub runtime: DoorRuntime,
    pub lease: Option<moat_sandbox::Lease>,
    pub ws: PathBuf,
    engine: moat_sandbox::Engine,
}

pub struct LibDoorSpec<'a> {
    pub allow: &'a [&'a str],
    pub pins: &'a [(&'a str, &'a str)],
    /// The fake resolver: name -> addresses. Absent names do not resolve.
    pub names: &'a [(&'a str, &'a [&'a str])],
}

impl LibSandbox {
    pub fn start(backend: Backend, name: &str, outside: &Netns, spec: LibDoorSpec) -> LibSandbox {
        let (dir, n) = fresh_dir(&format!("{name}-{}", backend.name()));
        let ws = dir.join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(ws.join("probe.py"), PROBE_PY).unwrap();
        let uid = 44000 + n;
        std::os::unix::fs::chown(&ws, Some(uid), Some(uid)).unwrap();

        let mut network = moat_policy::network::NetworkPolicy::default();
        for e in spec.allow {
            network
                .allow
                .push(moat_policy::network::parse_allow_entry(e).unwrap());
        }
        for (h, ip) in spec.pins {
            network.pins.insert(h.to_string(), ip.parse().unwrap());
        }
        let mut table: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (h, ips) in spec.names {
            table.insert(
                h.to_string(),
                ips.iter().map(|i| i.parse().unwrap()).collect(),
            );
        }
        let audit = Arc::new(moat_egress::MemoryAudit::default());
        let runtime = DoorRuntime::start_in(outside);
        let door = moat_egress::Door::start(
            runtime.handle(),
            moat_egress::DoorConfig {
                lease: format!("test-{name}"),
                policy: Arc::new(network.clone()),
                resolver: moat_egress::Resolver::Static(table),
                audit: audit.clone(),
                llm: None,
                github: None,
                amp: None,
            },
        )
        .expect("starting the door");
        let door_ns = Netns(door.netns());

        let init = Path::new(env!("CARGO_BIN_EXE_moat"))
            .parent()
            .unwrap()
            .join("moat-init");
        let engine = moat_sandbox::Engine::new(
            moat_sandbox::EngineConfig {
                data_dir: dir.join("data"),
                runtime_dir: dir.join("run"),
                init_path: init,
            },
            backend.kind(),
        )
        .expect("engine");
        let policy = moat_policy::SandboxPolicy {
            backend: backend.kind(),
            network,
            ..moat_policy::SandboxPolicy::default()
        };
        let lease = engine
            .lease(
                policy,
                moat_sandbox::LeaseOptions {
                    run_as: None,
                    name: None,
                    workspace: moat_sandbox::WorkspaceSource::Host(ws.clone()),
                    network: Some(moat_sandbox::NetworkAttachment {
                        netns: door.netns(),
                        env: moat_egress::Door::client_env(),
                        files: door.files(),
                    }),
                },
            )
            .expect("lease");
        LibSandbox {
            door: Some(door),
            door_ns,
            audit,
            runtime,
            lease: Some(lease),
            ws,
            engine,
        }
    }

    pub fn run_argv(&mut self, argv: &[&str]) -> Out {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut spec = moat_sandbox::RunSpec::new(argv.iter().copied());
        spec.timeout = Some(Duration::from_secs(120));
        let outcome = self
            .lease
            .as_mut()
            .unwrap()
            .run(spec, &mut |s, b| match s {
                moat_sandbox::Stream::Stdout => out.extend_from_slice(b),
                moat_sandbox::Stream::Stderr => err.extend_from_slice(b),
            })
            .expect("run");
        Out {
            code: Some(outcome.exit_code()),
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        }
    }

    pub fn sh(&mut self, script: &str) -> Out {
        self.run_argv(&["/bin/sh", "-c", &format!("{SH_PRELUDE}\n{script}")])
    }

    pub fn python(&mut self, code: &str) -> Value {
        let name = format!("t{}.py", COUNTER.fetch_add(1, Ordering::SeqCst));
        std::fs::write(
            self.ws.join(&name),
            format!("from probe import *\n{code}\ndone()\n"),
        )
        .unwrap();
        let out = self.run_argv(&["python3", &format!("/workspace/{name}")]);
        assert_eq!(out.code, Some(0), "probe failed: {out:?}");
        out.json()
    }

    pub fn audit(&self) -> Audit {
        Audit::from_memory(&self.audit)
    }
}

impl Drop for LibSandbox {
    fn drop(&mut self) {
        if let Some(l) = self.lease.take() {
            let _ = l.destroy();
        }
    }
}

//! Connection handling: the proxy port (absolute-form HTTP and CONNECT) and
//! the transparent ports (TLS by SNI, HTTP by Host, for names the DNS stub
//! handed out). Every path ends in exactly one audit record.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::Instant;

use moat_policy::network::{normalize_name, parse_ip_literal, Allowed};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::http::{self, Head, Reject};
use crate::tls::{self, Hello};
use crate::{EgressRecord, State, PROXY_PORT, STEP_TIMEOUT};

/// Connections one listener serves at once; more are closed at once (a
/// sandbox cannot exhaust moat's descriptors through its door).
pub(crate) const MAX_CONNECTIONS: usize = 4096;

fn over_limit(state: &State, kind: &'static str, port: u16) {
    let mut a = Attempt::new(kind);
    a.port = port;
    a.finish(
        state,
        Some(format!("more than {MAX_CONNECTIONS} connections at once")),
    );
}

/// Largest move per splice(2) call.
const SPLICE_CHUNK: usize = 1 << 20;

struct Attempt {
    kind: &'static str,
    host: String,
    port: u16,
    address: Option<SocketAddr>,
    started: Instant,
    up: u64,
    down: u64,
}

impl Attempt {
    fn new(kind: &'static str) -> Attempt {
        Attempt {
            kind,
            host: String::new(),
            port: 0,
            address: None,
            started: Instant::now(),
            up: 0,
            down: 0,
        }
    }
    fn finish(&self, state: &State, reason: Option<String>) {
        state.audit(EgressRecord {
            ts_ms: 0,
            lease: String::new(),
            kind: self.kind,
            host: self.host.clone(),
            port: self.port,
            address: self.address.map(|a| a.to_string()),
            verdict: if reason.is_none() {
                "allowed"
            } else {
                "denied"
            },
            reason,
            bytes_up: self.up,
            bytes_down: self.down,
            duration_ms: self.started.elapsed().as_millis() as u64,
        });
    }
}

async fn deny_http(
    state: &State,
    client: &mut TcpStream,
    a: &Attempt,
    status: u16,
    reason: String,
) {
    let _ = client.write_all(&http::refusal(status, &reason)).await;
    let _ = client.shutdown().await;
    a.finish(state, Some(reason));
}

pub(crate) async fn serve_proxy(state: Arc<State>, listener: TcpListener) {
    serve(state, listener, "connect", PROXY_PORT, |state, stream| {
        proxy_conn(state, stream)
    })
    .await
}

pub(crate) async fn serve_transparent(state: Arc<State>, listener: TcpListener, port: u16) {
    serve(
        state,
        listener,
        "transparent-tls",
        port,
        move |state, stream| transparent_conn(state, stream, port),
    )
    .await
}

/// Accepts connections and runs `handle` for each, at most `MAX_CONNECTIONS`
/// at once; the connections end with the listener's task (JoinSet aborts them).
async fn serve<F, Fut>(
    state: Arc<State>,
    listener: TcpListener,
    kind: &'static str,
    port: u16,
    handle: F,
) where
    F: Fn(Arc<State>, TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                if conns.len() < MAX_CONNECTIONS {
                    conns.spawn(handle(state.clone(), stream));
                } else {
                    over_limit(&state, kind, port);
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn read_request(client: &mut BufReader<TcpStream>) -> Result<Head, Reject> {
    let raw = timeout(STEP_TIMEOUT, http::read_head(client))
        .await
        .map_err(|_| Reject {
            status: 400,
            reason: "timed out waiting for the request head".into(),
        })??;
    http::parse_head(&raw)
}

async fn proxy_conn(state: Arc<State>, stream: TcpStream) {
    let mut client = BufReader::new(stream);
    let head = match read_request(&mut client).await {
        Ok(h) => h,
        Err(r) => {
            let a = Attempt::new("http");
            return deny_http(&state, client.get_mut(), &a, r.status, r.reason).await;
        }
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let mut a = Attempt::new("connect");
        let Some((host, port)) = http::split_authority(&head.target, 443) else {
            a.host = head.target.chars().take(255).collect();
            return deny_http(
                &state,
                client.get_mut(),
                &a,
                400,
                "malformed CONNECT target; write host:port".into(),
            )
            .await;
        };
        a.host = host.clone();
        a.port = port;
        if head.body != http::Body::None {
            return deny_http(
                &state,
                client.get_mut(),
                &a,
                400,
                "a CONNECT request has no body".into(),
            )
            .await;
        }
        return connect_tunnel(state, client, a).await;
    }
    let mut a = Attempt::new("http");
    let target = match http::parse_absolute(&head.target) {
        Ok(t) => t,
        Err(r) => return deny_http(&state, client.get_mut(), &a, r.status, r.reason).await,
    };
    a.host = target.host.clone();
    a.port = target.port;
    match head.header("host") {
        Some(v) if http::host_header_matches(v, &target.host, target.port, 80) => {}
        _ => {
            return deny_http(
                &state,
                client.get_mut(),
                &a,
                400,
                format!(
                    "the Host header does not name {}:{} as the URL does",
                    target.host, target.port
                ),
            )
            .await
        }
    }
    let path = target.path.clone();
    forward_http(state, client, head, path, a).await;
}

/// The verdict and the checked address, or the refusal to send.
async fn decide(state: &State, a: &mut Attempt) -> Result<(Allowed, SocketAddr), (u16, String)> {
    let allowed = state
        .cfg
        .policy
        .check(&a.host, a.port)
        .map_err(|d| (403, d.0))?;
    a.host = allowed.host.clone();
    let addr = state.resolve(&allowed).await.map_err(|d| (403, d.0))?;
    a.address = Some(addr);
    Ok((allowed, addr))
}

async fn connect_upstream(addr: SocketAddr) -> Result<TcpStream, String> {
    match timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
        Err(_) => Err(format!("connecting to {addr} timed out")),
    }
}

/// Checks that a ClientHello names the host the tunnel was opened for: the
/// same name for a name, no name at all for an IP address.
fn sni_matches(hello: &Hello, allowed: &Allowed) -> Result<(), String> {
    let is_ip = parse_ip_literal(&allowed.host).is_some();
    match hello {
        Hello::NotTls => {
            Err("the tunnel does not carry TLS; only TLS may pass through CONNECT".into())
        }
        Hello::Ambiguous(why) => Err(format!(
            "the TLS ClientHello names its server more than once ({why}); it must name {} once",
            allowed.host
        )),
        Hello::Tls { sni: None } if is_ip => Ok(()),
        Hello::Tls { sni: None } => Err(format!(
            "the TLS ClientHello names no server; it must name {}",
            allowed.host
        )),
        Hello::Tls { sni: Some(s) } => match normalize_name(s) {
            Some(n) if !is_ip && n == allowed.host => Ok(()),
            _ => Err(format!(
                "the TLS ClientHello names {:?}, not {} (domain fronting)",
                s.chars().take(255).collect::<String>(),
                allowed.host
            )),
        },
    }
}

async fn connect_tunnel(state: Arc<State>, mut client: BufReader<TcpStream>, mut a: Attempt) {
    if let Some(name) = intercepted(&state, &a.host, a.port) {
        if client
            .get_mut()
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return a.finish(&state, Some("the client went away".into()));
        }
        return intercept(state, client, a, name).await;
    }
    let (allowed, addr) = match decide(&state, &mut a).await {
        Ok(v) => v,
        Err((status, reason)) => {
            return deny_http(&state, client.get_mut(), &a, status, reason).await
        }
    };
    if client
        .get_mut()
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return a.finish(&state, Some("the client went away".into()));
    }
    let (hello, raw) = match timeout(STEP_TIMEOUT, tls::read_client_hello(&mut client)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return a.finish(&state, Some(format!("unreadable TLS ClientHello: {e}"))),
        Err(_) => {
            return a.finish(
                &state,
                Some("timed out waiting for the TLS ClientHello".into()),
            )
        }
    };
    if let Err(reason) = sni_matches(&hello, &allowed) {
        return a.finish(&state, Some(reason));
    }
    splice(state, client, raw, addr, a).await;
}

/// The normalized name if the door intercepts `host:port` (GitHub, Amp).
fn intercepted(state: &State, host: &str, port: u16) -> Option<String> {
    let name = normalize_name(host)?;
    state.intercepts(&name, port).then_some(name)
}

/// A tunnel to an intercepted host: its ClientHello must name that host; the
/// door then ends the TLS itself (crate::intercept) instead of connecting out.
async fn intercept(
    state: Arc<State>,
    mut client: BufReader<TcpStream>,
    mut a: Attempt,
    name: String,
) {
    a.kind = state
        .intercepted(&name, a.port)
        .map_or("github-tls", |s| s.tls_kind());
    a.host = name.clone();
    let (hello, raw) = match timeout(STEP_TIMEOUT, tls::read_client_hello(&mut client)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return a.finish(&state, Some(format!("unreadable TLS ClientHello: {e}"))),
        Err(_) => {
            return a.finish(
                &state,
                Some("timed out waiting for the TLS ClientHello".into()),
            )
        }
    };
    let target = Allowed {
        host: name.clone(),
        port: a.port,
        fixed: None,
    };
    if let Err(reason) = sni_matches(&hello, &target) {
        return a.finish(&state, Some(reason));
    }
    a.finish(&state, None);
    crate::intercept::serve_tls(state, client, raw, name).await;
}

/// Connects to the checked address, sends `first` (bytes already read from the
/// client), then copies both ways until either side closes.
async fn splice(
    state: Arc<State>,
    client: BufReader<TcpStream>,
    first: Vec<u8>,
    addr: SocketAddr,
    mut a: Attempt,
) {
    let mut upstream = match connect_upstream(addr).await {
        Ok(s) => s,
        Err(reason) => return a.finish(&state, Some(reason)),
    };
    let buffered = client.buffer().to_vec();
    let client = client.into_inner();
    if upstream.write_all(&first).await.is_err() || upstream.write_all(&buffered).await.is_err() {
        return a.finish(&state, Some(format!("{addr} closed the connection")));
    }
    a.up = (first.len() + buffered.len()) as u64;
    let (up, down) = tokio::join!(relay(&client, &upstream), relay(&upstream, &client));
    a.up += up;
    a.down = down;
    a.finish(&state, None);
}

/// Forwards one plain HTTP request (head already checked for shape) and its
/// response. One request per connection: nothing after the body is forwarded.
async fn forward_http(
    state: Arc<State>,
    mut client: BufReader<TcpStream>,
    head: Head,
    path: String,
    mut a: Attempt,
) {
    let (_, addr) = match decide(&state, &mut a).await {
        Ok(v) => v,
        Err((status, reason)) => {
            return deny_http(&state, client.get_mut(), &a, status, reason).await
        }
    };
    let upstream = match connect_upstream(addr).await {
        Ok(s) => s,
        Err(reason) => return deny_http(&state, client.get_mut(), &a, 502, reason).await,
    };
    let (mut ur, mut uw) = upstream.into_split();
    let out = http::upstream_head(&head, &path);
    if uw.write_all(&out).await.is_err() {
        return deny_http(
            &state,
            client.get_mut(),
            &a,
            502,
            format!("{addr} closed the connection"),
        )
        .await;
    }
    a.up = out.len() as u64;
    match http::copy_body(&mut client, &mut uw, head.body).await {
        Ok(n) => a.up += n,
        Err(e) => {
            return deny_http(
                &state,
                client.get_mut(),
                &a,
                400,
                format!("bad request body: {e}"),
            )
            .await
        }
    }
    a.down = tokio::io::copy(&mut ur, client.get_mut())
        .await
        .unwrap_or(0);
    let _ = client.get_mut().shutdown().await;
    a.finish(&state, None);
}

async fn transparent_conn(state: Arc<State>, stream: TcpStream, port: u16) {
    let mut a = Attempt::new("transparent-tls");
    a.port = port;
    let local = stream.local_addr().ok().map(|l| l.ip());
    let name = match local {
        Some(IpAddr::V4(v4)) => state.names.lock().ok().and_then(|t| t.name_at(v4)),
        _ => None,
    };
    let Some(name) = name else {
        a.host = local.map(|l| l.to_string()).unwrap_or_default();
        return a.finish(
            &state,
            Some(format!(
                "{}:{port} is not an address the DNS stub handed out",
                a.host
            )),
        );
    };
    a.host = name.clone();
    let mut client = BufReader::new(stream);
    let first = match timeout(STEP_TIMEOUT, client.fill_buf()).await {
        Ok(Ok(b)) if !b.is_empty() => b[0],
        _ => return a.finish(&state, Some("the client sent nothing".into())),
    };
    if first == 0x16 {
        if let Some(name) = intercepted(&state, &name, port) {
            return intercept(state, client, a, name).await;
        }
        let (allowed, addr) = match decide(&state, &mut a).await {
            Ok(v) => v,
            Err((_, reason)) => return a.finish(&state, Some(reason)),
        };
        let (hello, raw) = match timeout(STEP_TIMEOUT, tls::read_client_hello(&mut client)).await {
            Ok(Ok(v)) => v,
            _ => return a.finish(&state, Some("unreadable TLS ClientHello".into())),
        };
        if let Err(reason) = sni_matches(&hello, &allowed) {
            return a.finish(&state, Some(reason));
        }
        return splice(state, client, raw, addr, a).await;
    }
    a.kind = "transparent-http";
    let head = match read_request(&mut client).await {
        Ok(h) => h,
        Err(r) => return deny_http(&state, client.get_mut(), &a, r.status, r.reason).await,
    };
    let path = if head.target.starts_with('/') {
        head.target.clone()
    } else {
        match http::parse_absolute(&head.target) {
            Ok(t)
                if normalize_name(&t.host).as_deref() == Some(name.as_str()) && t.port == port =>
            {
                t.path
            }
            _ => {
                return deny_http(
                    &state,
                    client.get_mut(),
                    &a,
                    400,
                    format!("the request target does not name {name}:{port}"),
                )
                .await
            }
        }
    };
    match head.header("host") {
        Some(v) if http::host_header_matches(v, &name, port, port) => {}
        _ => {
            return deny_http(
                &state,
                client.get_mut(),
                &a,
                400,
                format!("the Host header does not name {name}"),
            )
            .await
        }
    }
    forward_http(state, client, head, path, a).await;
}

/// Moves bytes from `from` to `to` inside the kernel (splice(2) through a
/// pipe, no copy into the door's memory) until `from` closes; then closes
/// `to`'s sending side. Returns the bytes moved.
async fn relay(from: &TcpStream, to: &TcpStream) -> u64 {
    use std::os::fd::{AsRawFd, OwnedFd};
    use tokio::io::Interest;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return 0;
    }
    // SAFETY: both descriptors are fresh from pipe2 and owned here.
    let (pr, pw) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on our pipe; failure only means a smaller pipe.
    unsafe {
        libc::fcntl(
            pw.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            SPLICE_CHUNK as libc::c_int,
        )
    };
    let splice = |i: i32, o: i32, len: usize| -> std::io::Result<usize> {
        // SAFETY: splice between descriptors we hold, without offsets.
        let n = unsafe {
            libc::splice(
                i,
                std::ptr::null_mut(),
                o,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    };
    let mut total = 0u64;
    loop {
        let n = loop {
            if from.readable().await.is_err() {
                return total;
            }
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pw.as_raw_fd(), SPLICE_CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break 0, // reset or error: treat as the end of this direction
            }
        };
        if n == 0 {
            // SAFETY: half-close the sending side of a socket we hold.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return total;
        }
        let mut left = n;
        while left > 0 {
            if to.writable().await.is_err() {
                return total;
            }
            match to.try_io(Interest::WRITABLE, || {
                splice(pr.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return total,
            }
        }
        total += n as u64;
    }
}

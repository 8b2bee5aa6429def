//! The egress door benchmark (`scripts/bench`; needs root for the network
//! namespace). One run, one machine, each number next to its baseline:
//! - throughput of a large download through a CONNECT tunnel vs a direct connection;
//! - time to the first byte of a new connection through the door vs direct;
//! - 1,000 concurrent tunnels held open: errors, and memory of this process.
//!
//! The upstream is a local TCP server that reads one TLS record (the client's
//! ClientHello, which the door checks) and then streams bytes; nothing leaves
//! this machine. Prints Markdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_egress::{Door, DoorConfig, MemoryAudit, Resolver, PROXY_PORT};
use moat_policy::network::{parse_allow_entry, NetworkPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn hello(sni: &str) -> Vec<u8> {
    let n = sni.as_bytes();
    let mut sn = Vec::new();
    sn.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
    sn.push(0);
    sn.extend_from_slice(&(n.len() as u16).to_be_bytes());
    sn.extend_from_slice(n);
    let mut exts = vec![0, 0];
    exts.extend_from_slice(&(sn.len() as u16).to_be_bytes());
    exts.extend_from_slice(&sn);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[1u8; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 1, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// Reads one TLS record, then sends `bytes` bytes (0: one byte, then waits for
/// EOF), at most `rate` bytes per second when `rate` is not 0 (a network link).
async fn upstream(listener: TcpListener, bytes: u64, rate: u64) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut h = [0u8; 5];
            if s.read_exact(&mut h).await.is_err() {
                return;
            }
            let mut body = vec![0u8; u16::from_be_bytes([h[3], h[4]]) as usize];
            if s.read_exact(&mut body).await.is_err() {
                return;
            }
            if bytes == 0 {
                let _ = s.write_all(b"x").await;
                let _ = s.read(&mut [0u8; 1]).await;
                return;
            }
            let chunk = vec![0x5au8; 256 * 1024];
            let mut left = bytes;
            let start = Instant::now();
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
                if rate > 0 {
                    let due = Duration::from_secs_f64((bytes - left) as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
    }
}

async fn tunnel(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", PROXY_PORT)).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut resp = Vec::new();
    let mut b = [0u8; 1];
    while !resp.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(std::io::Error::other("proxy closed"));
        }
        resp.push(b[0]);
    }
    if !resp.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&resp).into_owned(),
        ));
    }
    s.write_all(&hello(host)).await?;
    Ok(s)
}

async fn direct(addr: SocketAddr, host: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&hello(host)).await?;
    Ok(s)
}

async fn drain(mut s: TcpStream) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total
}

fn median_p90(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(v[v.len() / 2]), us(v[v.len() * 9 / 10]))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let quick = std::env::var("MOAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty());
    let size: u64 = if quick { 128 << 20 } else { 1 << 30 };
    let conns = if quick { 100 } else { 1000 };
    let lim = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: raising our own descriptor limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // 1 Gbit/s, for the paced case.
    const LINK: u64 = 125_000_000;
    let link_size: u64 = if quick { 64 << 20 } else { 256 << 20 };
    let (bulk_addr, ping_addr, link_addr) = rt.block_on(async {
        let bulk = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let ping = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let link = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addrs = (
            bulk.local_addr().expect("addr"),
            ping.local_addr().expect("addr"),
            link.local_addr().expect("addr"),
        );
        tokio::spawn(upstream(bulk, size, 0));
        tokio::spawn(upstream(ping, 0, 0));
        tokio::spawn(upstream(link, link_size, LINK));
        addrs
    });
    let mut pins = BTreeMap::new();
    pins.insert("bulk.test".to_string(), bulk_addr.ip());
    pins.insert("ping.test".to_string(), ping_addr.ip());
    pins.insert("link.test".to_string(), link_addr.ip());
    let policy = NetworkPolicy {
        allow: vec![
            parse_allow_entry(&format!("bulk.test:{}", bulk_addr.port())).expect("entry"),
            parse_allow_entry(&format!("ping.test:{}", ping_addr.port())).expect("entry"),
            parse_allow_entry(&format!("link.test:{}", link_addr.port())).expect("entry"),
        ],
        pins,
    };
    let audit = Arc::new(MemoryAudit::default());
    let door = Door::start(
        rt.handle(),
        DoorConfig {
            lease: "bench".into(),
            policy: Arc::new(policy),
            resolver: Resolver::Static(Default::default()),
            audit: audit.clone(),
            llm: None,
            github: None,
            amp: None,
        },
    )
    .expect("door (run as root)");

    // Clients inside the sandbox's namespace: a thread that entered it runs them.
    let inside = |work: Box<dyn FnOnce() -> String + Send>| -> String {
        moat_egress::netns::in_netns(&door.netns(), move || Ok(work())).expect("client thread")
    };

    println!("## Egress door\n");
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    // Median MiB/s of three alternating downloads, direct and tunnelled.
    let measure = |addr: SocketAddr, host: &'static str, size: u64| -> (f64, f64) {
        let mut direct_rates = Vec::new();
        let mut tunnel_rates = Vec::new();
        for _ in 0..3 {
            // The same client shape as the tunnel's: its own thread and runtime.
            direct_rates.push(
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("rt");
                    rt.block_on(async {
                        let t = Instant::now();
                        let n = drain(direct(addr, host).await.expect("direct")).await;
                        assert_eq!(n, size);
                        size as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
                    })
                })
                .join()
                .expect("direct client"),
            );
            let port = addr.port();
            let r: f64 = inside(Box::new(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("rt");
                rt.block_on(async {
                    let t = Instant::now();
                    let n = drain(tunnel(host, port).await.expect("tunnel")).await;
                    assert_eq!(n, size);
                    (size as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()).to_string()
                })
            }))
            .parse()
            .unwrap_or(0.0);
            tunnel_rates.push(r);
        }
        (med(direct_rates), med(tunnel_rates))
    };
    println!("### Throughput of one download (median of 3, alternating direct and tunnelled)\n");
    println!("| upstream | size | direct MiB/s | through the door MiB/s | ratio |\n|---|---|---|---|---|");
    let (d, t) = measure(bulk_addr, "bulk.test", size);
    println!("| on loopback, unpaced (CPU-bound: the door's relay shares 2 cores with client and server) | {} MiB | {d:.0} | {t:.0} | {:.2} |", size >> 20, t / d);
    let (d, t) = measure(link_addr, "link.test", link_size);
    println!(
        "| paced to 1 Gbit/s (a network link) | {} MiB | {d:.0} | {t:.0} | {:.2} |",
        link_size >> 20,
        t / d
    );
    println!();

    let n = if quick { 100 } else { 1000 };
    println!("\n### Time to first byte of a new connection ({n} sequential connections)\n");
    println!("| path | median µs | p90 µs |\n|---|---|---|");
    let direct_lat = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let mut s = direct(ping_addr, "ping.test").await.expect("direct");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("byte");
            v.push(t.elapsed());
        }
        median_p90(v)
    });
    let pport = ping_addr.port();
    let tunnel_lat = inside(Box::new(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                let mut s = tunnel("ping.test", pport).await.expect("tunnel");
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.expect("byte");
                v.push(t.elapsed());
            }
            let (m, p) = median_p90(v);
            format!("{m} {p}")
        })
    }));
    let mut it = tunnel_lat
        .split(' ')
        .map(|x| x.parse::<f64>().unwrap_or(0.0));
    let (tm, tp) = (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0));
    println!("| direct | {:.0} | {:.0} |", direct_lat.0, direct_lat.1);
    println!("| through the door (CONNECT + SNI check + upstream connect) | {tm:.0} | {tp:.0} |");
    println!(
        "\nAdded latency at the median: {:.0} µs.",
        tm - direct_lat.0
    );

    println!("\n### {conns} concurrent tunnels held open\n");
    let before = rss_kib();
    let result = inside(Box::new(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let mut held = Vec::new();
            let mut errors = 0;
            for _ in 0..conns {
                match tunnel("ping.test", pport).await {
                    Ok(mut s) => {
                        let mut b = [0u8; 1];
                        if s.read_exact(&mut b).await.is_ok() {
                            held.push(s);
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            let during = rss_kib();
            let open = held.len();
            drop(held);
            format!("{open} {errors} {during}")
        })
    }));
    let v: Vec<u64> = result.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
    println!("| tunnels open at once | errors | memory of this process while held (door + clients + upstream) |\n|---|---|---|");
    println!(
        "| {} | {} | +{:.1} MiB ({:.1} KiB per tunnel) |",
        v[0],
        v[1],
        (v[2].saturating_sub(before)) as f64 / 1024.0,
        (v[2].saturating_sub(before)) as f64 / v[0].max(1) as f64
    );
    let records = audit.snapshot().len();
    println!("\nAudit records written: {records} (one per connection).");
    drop(door);
    rt.shutdown_background();
}

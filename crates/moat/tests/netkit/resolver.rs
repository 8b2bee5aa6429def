//! A DNS server of the test's own, and a way to point one `moat` process's
//! host-side name lookups (getaddrinfo, as the door's `Resolver::System`
//! does them) at it: the process starts in a private mount namespace where
//! `/etc/resolv.conf` is a scratch file naming this server. The real
//! `/etc/resolv.conf` is never written.
//!
//! The server listens on a random 127.53.x.y address, port 53 (UDP and TCP),
//! in the host's network namespace, records every name it is asked about,
//! answers the names it was given and refuses the rest with NXDOMAIN.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

pub struct TestResolver {
    pub addr: Ipv4Addr,
    pub resolv_conf: PathBuf,
    asked: Arc<Mutex<Vec<String>>>,
}

impl TestResolver {
    /// Starts the server; `answers` are the names it knows (A records).
    /// Writes `dir/resolv.conf` naming it.
    pub fn start(dir: &Path, answers: &[(&str, Ipv4Addr)]) -> TestResolver {
        let answers: Arc<HashMap<String, Ipv4Addr>> = Arc::new(
            answers
                .iter()
                .map(|(n, a)| (n.to_ascii_lowercase(), *a))
                .collect(),
        );
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut last = None;
        for _ in 0..50 {
            let r = super::random_hex(2);
            let b = u16::from_str_radix(&r, 16).unwrap().to_be_bytes();
            let addr = Ipv4Addr::new(127, 53, b[0], b[1].max(1));
            let sa = SocketAddr::from((addr, 53));
            let (udp, tcp) = match (UdpSocket::bind(sa), TcpListener::bind(sa)) {
                (Ok(u), Ok(t)) => (u, t),
                (u, t) => {
                    last = Some(format!("{:?} {:?}", u.err(), t.err()));
                    continue;
                }
            };
            {
                let (asked, answers) = (asked.clone(), answers.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                        if let Some(reply) = handle(&buf[..n], &asked, &answers) {
                            let _ = udp.send_to(&reply, peer);
                        }
                    }
                });
            }
            {
                let (asked, answers) = (asked.clone(), answers.clone());
                std::thread::spawn(move || {
                    for mut s in tcp.incoming().flatten() {
                        asked.lock().unwrap().push("<tcp connection>".into());
                        let mut len = [0u8; 2];
                        if s.read_exact(&mut len).is_err() {
                            continue;
                        }
                        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                        if s.read_exact(&mut msg).is_err() {
                            continue;
                        }
                        if let Some(reply) = handle(&msg, &asked, &answers) {
                            let mut out = (reply.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&reply);
                            let _ = s.write_all(&out);
                        }
                    }
                });
            }
            let resolv_conf = dir.join("resolv.conf");
            std::fs::write(
                &resolv_conf,
                format!("nameserver {addr}\noptions timeout:2 attempts:1\n"),
            )
            .unwrap();
            return TestResolver {
                addr,
                resolv_conf,
                asked,
            };
        }
        panic!("no free 127.53.x.y:53 for the test's resolver: {last:?}");
    }

    /// Every name asked so far (lowercase; `<tcp connection>` for each TCP
    /// connection, `<malformed>` for a message that was not a query).
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }

    /// Makes `cmd` use this resolver (see `point`).
    pub fn point(&self, cmd: &mut Command) {
        point(cmd, &self.resolv_conf)
    }
}

/// Makes `cmd` start in a private mount namespace whose `/etc/resolv.conf`
/// is `resolv_conf`.
pub fn point(cmd: &mut Command, resolv_conf: &Path) {
    {
        let src = CString::new(resolv_conf.as_os_str().as_bytes()).unwrap();
        // SAFETY: between fork and exec only raw system calls run (unshare,
        // mount) on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let flags = libc::MS_REC | libc::MS_PRIVATE;
                if libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::mount(
                    src.as_ptr(),
                    c"/etc/resolv.conf".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Records the question of `msg` and builds the answer.
fn handle(
    msg: &[u8],
    asked: &Mutex<Vec<String>>,
    answers: &HashMap<String, Ipv4Addr>,
) -> Option<Vec<u8>> {
    let Some((name, qtype, end)) = question(msg) else {
        asked.lock().unwrap().push("<malformed>".into());
        return None;
    };
    asked.lock().unwrap().push(name.clone());
    let mut r = msg[..2].to_vec(); // id
    let known = answers.get(&name);
    let a = known.filter(|_| qtype == 1);
    r.extend_from_slice(&[0x81, if known.is_some() { 0x80 } else { 0x83 }]);
    r.extend_from_slice(&[0, 1, 0, u8::from(a.is_some()), 0, 0, 0, 0]);
    r.extend_from_slice(&msg[12..end]);
    if let Some(a) = a {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        r.extend_from_slice(&a.octets());
    }
    Some(r)
}

/// (lowercase name, qtype, end of the question) of a one-question query.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || msg[4..6] != [0, 1] {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let n = *msg.get(at)? as usize;
        at += 1;
        if n == 0 {
            break;
        }
        if n > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(msg.get(at..at + n)?).to_ascii_lowercase());
        at += n;
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    msg.get(at + 2..at + 4)?;
    Some((labels.join("."), qtype, at + 4))
}

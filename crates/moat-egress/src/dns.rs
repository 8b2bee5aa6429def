//! The DNS stub on the sandbox's 127.0.0.1:53 (UDP and TCP). It never
//! forwards a query anywhere: a name the allowlist allows gets an address in
//! 127.100.0.0/16 that leads back to the door (which remembers which name it
//! stands for); every other name gets REFUSED. The query names are the only
//! thing recorded.

use std::sync::Arc;

use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::{EgressRecord, State, STEP_TIMEOUT};

/// Builds the answer to one query message; `None` for a message that is not
/// a parseable query (dropped without an answer).
pub(crate) fn answer(state: &State, query: &[u8]) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let mut reply = Packet::new_reply(q.id());
    let mut refused = false;
    let mut names: Vec<String> = Vec::new();
    for question in &q.questions {
        let name = question.qname.to_string();
        names.push(name.clone());
        reply.questions.push(question.clone());
        let intercepted =
            moat_policy::network::normalize_name(&name).is_some_and(|n| state.intercepts(&n, 443));
        if !intercepted && !state.cfg.policy.name_allowed(&name) {
            refused = true;
            continue;
        }
        let Some(norm) = moat_policy::network::normalize_name(&name) else {
            continue;
        };
        let Some(addr) = state
            .names
            .lock()
            .ok()
            .and_then(|mut t| t.address_for(&norm))
        else {
            continue;
        };
        if question.qtype == QTYPE::TYPE(TYPE::A) {
            reply.answers.push(ResourceRecord::new(
                question.qname.clone(),
                CLASS::IN,
                5,
                RData::A(A {
                    address: u32::from(addr),
                }),
            ));
        }
    }
    if refused {
        *reply.rcode_mut() = RCODE::Refused;
        reply.answers.clear();
    }
    for name in names {
        state.audit(EgressRecord {
            ts_ms: 0,
            lease: String::new(),
            kind: "dns",
            host: name.chars().take(255).collect(),
            port: crate::DNS_PORT,
            address: None,
            verdict: if refused { "denied" } else { "allowed" },
            reason: refused.then(|| {
                "the name is not on the allowlist; the stub never forwards queries".to_string()
            }),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        });
    }
    reply.build_bytes_vec().ok()
}

pub(crate) async fn serve_udp(state: Arc<State>, sock: UdpSocket) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(resp) = answer(&state, &buf[..n]) {
            let _ = sock.send_to(&resp, peer).await;
        }
    }
}

/// Serves DNS over TCP: at most `MAX_CONNECTIONS` at once (more are closed at
/// once), and a connection idle for `STEP_TIMEOUT` is closed, so a sandbox
/// cannot pile up descriptors in moat through its stub.
pub(crate) async fn serve_tcp(state: Arc<State>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let mut s = match accepted {
                    Ok((s, _)) => s,
                    Err(_) => {
                        // Out of descriptors, say: do not spin on the error.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if conns.len() >= crate::conn::MAX_CONNECTIONS {
                    continue; // dropping `s` closes it
                }
                let state = state.clone();
                conns.spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        match timeout(STEP_TIMEOUT, s.read_exact(&mut len)).await {
                            Ok(Ok(_)) => {}
                            _ => return,
                        }
                        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                        match timeout(STEP_TIMEOUT, s.read_exact(&mut msg)).await {
                            Ok(Ok(_)) => {}
                            _ => return,
                        }
                        let Some(resp) = answer(&state, &msg) else { return };
                        let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&resp);
                        match timeout(STEP_TIMEOUT, s.write_all(&out)).await {
                            Ok(Ok(_)) => {}
                            _ => return,
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NameTable;
    use crate::{DoorConfig, MemoryAudit, Resolver};
    use std::sync::Mutex;

    fn state() -> Arc<State> {
        let policy = moat_policy::network::NetworkPolicy {
            allow: vec![moat_policy::network::parse_allow_entry("web.test").unwrap()],
            pins: Default::default(),
        };
        Arc::new(State {
            cfg: DoorConfig {
                lease: "t".into(),
                policy: Arc::new(policy),
                resolver: Resolver::Static(Default::default()),
                audit: Arc::new(MemoryAudit::default()),
                llm: None,
                github: None,
                amp: None,
            },
            names: Mutex::new(NameTable::default()),
            llm: None,
            github: None,
            amp: None,
            intercept: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tcp_connections_are_closed() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_tcp(state(), l));
        // One that never sends, one that stops halfway through a message.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(&[0, 40, 1, 2]).await.unwrap();
        let mut buf = [0u8; 1];
        for s in [&mut idle, &mut half] {
            let n = timeout(STEP_TIMEOUT * 2, s.read(&mut buf))
                .await
                .expect("the stub kept an idle connection")
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
    }
}

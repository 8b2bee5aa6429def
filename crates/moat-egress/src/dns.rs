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

use crate::{EgressRecord, State};

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
        if !state.cfg.policy.name_allowed(&name) {
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

pub(crate) async fn serve_tcp(state: Arc<State>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut s, _)) = accepted else { continue };
                let state = state.clone();
                conns.spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        if s.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                        if s.read_exact(&mut msg).await.is_err() {
                            return;
                        }
                        let Some(resp) = answer(&state, &msg) else { return };
                        let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&resp);
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

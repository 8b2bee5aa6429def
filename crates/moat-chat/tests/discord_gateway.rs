//! The Discord Gateway client against a one-connection WebSocket server on
//! 127.0.0.1: close codes Discord documents as final (4004 bad token, 4014
//! disallowed intents) stop it with their reason and never the token, and
//! the IDENTIFY it sends carries the token, the intents and no compression.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use moat_chat::discord::gateway::{run, GatewayError, GatewayParams, INTENTS};
use moat_creds::Secret;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "MTEx.gateway-test-token-never-shown";

/// Serves one HELLO, records the IDENTIFY, closes with `code`.
async fn server(code: u16) -> (String, tokio::task::JoinHandle<Value>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
        ws.send(Message::text(
            json!({"op": 10, "d": {"heartbeat_interval": 45000}}).to_string(),
        ))
        .await
        .unwrap();
        let identify = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => break serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("no IDENTIFY: {other:?}"),
            }
        };
        ws.close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: "refused".into(),
        }))
        .await
        .unwrap();
        // Let the close reach the client.
        while let Some(Ok(_)) = ws.next().await {}
        identify
    });
    (url, task)
}

fn params(url: String) -> GatewayParams {
    let api =
        moat_chat::discord::RestApi::new("http://127.0.0.1:1", true, Secret::new("x")).unwrap();
    GatewayParams {
        url,
        allow_plain: true,
        token: Secret::new(TOKEN),
        tls: api.tls().clone(),
    }
}

#[tokio::test]
async fn final_close_codes_stop_the_gateway_with_their_reason_and_no_token() {
    for (code, words) in [(4004, "DISCORD_BOT_TOKEN"), (4014, "Message Content")] {
        let (url, srv) = server(code).await;
        let handler = |_d| async { Ok::<(), String>(()) };
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            run(params(url), handler, std::future::pending()),
        )
        .await
        .expect("the gateway kept retrying a final close code");
        let Err(e @ GatewayError::Refused { .. }) = r else {
            panic!("{code}: {r:?}")
        };
        let text = e.to_string();
        assert!(
            text.contains(&code.to_string()) && text.contains(words),
            "{text}"
        );
        assert!(!text.contains(TOKEN), "{text}");
        let identify = srv.await.unwrap();
        assert_eq!(identify["op"], json!(2));
        assert_eq!(identify["d"]["token"], json!(TOKEN));
        assert_eq!(identify["d"]["intents"], json!(INTENTS));
        assert!(identify["d"].get("compress").is_none());
    }
}

/// A dispatch the handler could not store is not counted: the connection is
/// dropped with a resumable close (not 1000/1001) and RESUMEd from the
/// sequence before it, so Discord replays it and it is handled then.
#[tokio::test]
async fn a_dispatch_not_stored_is_resumed_and_replayed() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", l.local_addr().unwrap());
    let resume_url = url.clone();
    let srv = tokio::spawn(async move {
        let mut seen = Vec::new(); // (connection, frame)
        let mut close_code = None;
        for conn in 0..2 {
            let (s, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            let send = |v: Value| Message::text(v.to_string());
            ws.send(send(json!({"op": 10, "d": {"heartbeat_interval": 45000}})))
                .await
                .unwrap();
            let first: Value = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap();
                        if v["op"] != json!(1) {
                            break v;
                        }
                    }
                    Some(Ok(_)) => continue,
                    other => panic!("nothing after HELLO: {other:?}"),
                }
            };
            seen.push((conn, first.clone()));
            let msg = |s: u64| json!({"op": 0, "s": s, "t": "MESSAGE_CREATE", "d": {"n": s}});
            if conn == 0 {
                ws.send(send(json!({"op": 0, "s": 1, "t": "READY",
                    "d": {"session_id": "sess-1", "resume_gateway_url": resume_url}})))
                    .await
                    .unwrap();
                ws.send(send(msg(2))).await.unwrap();
                ws.send(send(msg(3))).await.unwrap();
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Close(c) = m {
                        close_code = c.map(|c| u16::from(c.code));
                        break;
                    }
                }
            } else {
                let from = first["d"]["seq"].as_u64().unwrap();
                for s in (from + 1)..=3 {
                    ws.send(send(msg(s))).await.unwrap();
                }
                ws.send(send(json!({"op": 0, "s": 4, "t": "RESUMED", "d": null})))
                    .await
                    .unwrap();
                // Keep the connection until the client stops.
                while let Some(Ok(_)) = ws.next().await {}
            }
        }
        (seen, close_code)
    });
    let handled = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = handled.clone();
    let handler = move |d: moat_chat::discord::gateway::Dispatch| {
        let h = h.clone();
        async move {
            let mut v = h.lock().unwrap();
            let first_time = !v.iter().any(|(s, _)| *s == d.seq);
            let ok = !(d.seq == 2 && first_time);
            v.push((d.seq, ok));
            if ok {
                Ok(())
            } else {
                Err("the store is down".to_string())
            }
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let done = handled.clone();
    let watcher = tokio::spawn(async move {
        for _ in 0..400 {
            if done.lock().unwrap().iter().filter(|(_, ok)| *ok).count() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = stop_tx.send(());
    });
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        run(params(url), handler, async move {
            let _ = stop_rx.await;
        }),
    )
    .await
    .expect("the gateway did not stop");
    assert!(r.is_ok(), "{r:?}");
    watcher.await.unwrap();
    let (seen, close_code) = srv.await.unwrap();
    assert_eq!(
        *handled.lock().unwrap(),
        vec![(2, false), (2, true), (3, true)],
        "seq 2 failed once, then was replayed and stored; 3 once"
    );
    assert_eq!(seen[0].1["op"], json!(2), "IDENTIFY first");
    assert_eq!(seen[1].1["op"], json!(6), "then RESUME");
    assert_eq!(seen[1].1["d"]["session_id"], json!("sess-1"));
    assert_eq!(
        seen[1].1["d"]["seq"],
        json!(1),
        "from before the failed one"
    );
    let code = close_code.expect("a close frame");
    assert!(code != 1000 && code != 1001, "{code} would end the session");
}

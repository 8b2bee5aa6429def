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

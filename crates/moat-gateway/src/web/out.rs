//! The web chat's side of the platform interface: every step of a turn is
//! an event on the conversation's hub broadcast, which the page (and `moat
//! chat`) watch; artifacts are kept on the hub's shelf for the owner to
//! download.
//!
//! Must never: publish one conversation's events or artifacts under
//! another conversation's id.

use std::sync::Arc;

use crate::agent::TurnOutcome;
use crate::approvals::{ApprovalPost, Decision};
use crate::artifacts::Artifact;
use crate::hub::{ConvEvent, Hub};
use crate::platform::{decision_text, BoxFut, ChatPlatform, ConvRef};

/// Publishes a conversation's turn to the hub.
pub struct WebChat {
    hub: Arc<Hub>,
}

impl WebChat {
    pub fn new(hub: Arc<Hub>) -> WebChat {
        WebChat { hub }
    }

    fn publish(&self, conv: &ConvRef, ev: ConvEvent) -> BoxFut<'static> {
        self.hub.publish(conv.id, ev);
        Box::pin(async {})
    }
}

impl ChatPlatform for WebChat {
    fn notice<'a>(&'a self, conv: &'a ConvRef, text: &'a str) -> BoxFut<'a> {
        self.publish(conv, ConvEvent::Notice { text: text.into() })
    }

    fn said<'a>(
        &'a self,
        conv: &'a ConvRef,
        message_id: i64,
        user: &'a str,
        text: &'a str,
    ) -> BoxFut<'a> {
        self.publish(
            conv,
            ConvEvent::Message {
                user: user.into(),
                text: text.into(),
                id: Some(message_id),
            },
        )
    }

    fn approval<'a>(
        &'a self,
        conv: &'a ConvRef,
        req: &'a ApprovalPost,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + 'a>> {
        self.hub.publish(
            conv.id,
            ConvEvent::Approval {
                id: req.id.clone(),
                summary: req.summary.clone(),
                detail: req.detail.clone(),
                url: format!("/api/approvals/{}", req.id),
            },
        );
        Box::pin(async { None })
    }

    fn approval_decided<'a>(
        &'a self,
        conv: &'a ConvRef,
        req: &'a ApprovalPost,
        _asked: Option<&'a str>,
        d: &'a Decision,
    ) -> BoxFut<'a> {
        self.publish(
            conv,
            ConvEvent::Decided {
                id: req.id.clone(),
                text: decision_text(d),
            },
        )
    }

    fn started<'a>(&'a self, _conv: &'a ConvRef, _refs: &'a [String]) -> BoxFut<'a> {
        Box::pin(async {})
    }

    fn phase<'a>(&'a self, conv: &'a ConvRef, text: &'a str) -> BoxFut<'a> {
        self.publish(conv, ConvEvent::Status { text: text.into() })
    }

    fn progress<'a>(&'a self, conv: &'a ConvRef, status: &'a str) -> BoxFut<'a> {
        self.publish(
            conv,
            ConvEvent::Status {
                text: status.into(),
            },
        )
    }

    fn partial<'a>(&'a self, conv: &'a ConvRef, text: &'a str) -> BoxFut<'a> {
        self.publish(conv, ConvEvent::Text { text: text.into() })
    }

    fn artifacts<'a>(
        &'a self,
        conv: &'a ConvRef,
        _refs: &'a [String],
        files: &'a [Artifact],
    ) -> BoxFut<'a> {
        for a in files {
            let url = self
                .hub
                .keep_artifact(conv.id, a)
                .map(|id| format!("/api/conversations/{}/artifacts/{id}", conv.thread));
            self.hub.publish(
                conv.id,
                ConvEvent::Artifact {
                    name: a.name.clone(),
                    size: a.size(),
                    sha256: a.sha256.clone(),
                    url,
                },
            );
        }
        Box::pin(async {})
    }

    fn finished<'a>(
        &'a self,
        conv: &'a ConvRef,
        _refs: &'a [String],
        outcome: &'a TurnOutcome,
    ) -> BoxFut<'a> {
        self.publish(
            conv,
            ConvEvent::Answer {
                text: outcome.answer.clone(),
                ok: outcome.ok,
                turn: None,
                verbatim: outcome.preformatted,
            },
        )
    }

    fn deliver<'a>(
        &'a self,
        conv: &'a ConvRef,
        _refs: &'a [String],
        outcome: &'a TurnOutcome,
        turn: i64,
    ) -> BoxFut<'a> {
        self.publish(
            conv,
            ConvEvent::Answer {
                text: outcome.answer.clone(),
                ok: outcome.ok,
                turn: Some(turn),
                verbatim: outcome.preformatted,
            },
        )
    }
}

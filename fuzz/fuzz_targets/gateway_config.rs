//! The gateway configuration loader (`GatewayConfig::from_toml`): any text
//! an operator (or a copied example) puts in `moat.toml`.
//!
//! Beyond "no panic": a loaded configuration keeps the promises the
//! loader's validation makes to the rest of moat (an absolute data
//! directory other than `/`; no admins in an untrusted channel; without a
//! channel entry nobody may talk; a user not listed is never allowed in a
//! channel without `*`); an error names a key and a line inside the text;
//! loading is deterministic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_policy::gateway::{Authorization, GatewayConfig, Platform, Trust};
use moat_policy::PolicyError;

const STRANGER: &str = "U-not-in-any-list-\u{1F512}";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match GatewayConfig::from_toml(text) {
        Ok(c) => c,
        Err(e) => {
            assert!(GatewayConfig::from_toml(text).is_err());
            match &e {
                PolicyError::Syntax { key, line, .. } => {
                    assert!(!key.is_empty());
                    if let Some(l) = line {
                        assert!(*l >= 1 && *l <= text.lines().count().max(1) + 1, "line {l}");
                    }
                }
                PolicyError::Invalid { key, message } => {
                    assert!(!key.is_empty() && !message.is_empty());
                }
            }
            return;
        }
    };
    assert!(cfg.data_dir.is_absolute() && cfg.data_dir.components().count() > 1);
    for platform in [Platform::Slack, Platform::Web, Platform::Cli] {
        assert!(!cfg.authorize(platform, "", "U1").is_allowed());
        if cfg.channels.iter().all(|c| c.platform != platform) {
            assert!(!cfg.authorize(platform, "C1", "U1").is_allowed());
        }
    }
    for c in &cfg.channels {
        let id = if c.is_wildcard() {
            "C-only-the-wildcard"
        } else {
            c.id.as_str()
        };
        if c.trust == Trust::Untrusted {
            assert!(
                c.admins.is_empty(),
                "admins in untrusted channel[{}]",
                c.index
            );
        }
        // An id belongs to one platform: only this channel's platform's
        // admins can be told apart here.
        for (_, admin) in c.admins.ids.iter().filter(|(p, _)| *p == c.platform) {
            match cfg.authorize(c.platform, id, admin) {
                Authorization::Allowed { trust, .. } => {
                    assert!(trust != Trust::Admin || c.trust != Trust::Untrusted)
                }
                Authorization::Denied { reason } => {
                    // Only when another entry with this exact id comes first.
                    assert!(
                        cfg.channel(c.platform, id)
                            .is_some_and(|o| o.index != c.index),
                        "{reason}"
                    );
                }
            }
        }
        if let Some(chosen) = cfg.channel(c.platform, id) {
            if !chosen.users.contains(c.platform, STRANGER)
                && !chosen.admins.contains(c.platform, STRANGER)
            {
                assert!(!cfg.authorize(c.platform, id, STRANGER).is_allowed());
            }
            assert!(!cfg.authorize(c.platform, id, "").is_allowed());
        }
    }
});

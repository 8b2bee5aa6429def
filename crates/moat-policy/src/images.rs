//! The image keys of a channel (`image = "NAME"`, `root_inside = true`,
//! docs/images.md) and the shape of an image name.
//!
//! Owns: validating the keys with errors naming them. Must never: look at
//! the disk (whether the image exists is checked by `moat up` against the
//! data directory), or allow `root_inside` without an image (on the host's
//! `/usr` there is nothing a writable layer could sit on).

use crate::{PolicyError, SandboxPolicy};

fn err(key: String, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key,
        message: message.into(),
    }
}

/// An image name: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit
/// (it names a directory under the data directory).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an image name: use 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        ))
    }
}

/// Applies `image` and `root_inside` of the section `at` (`defaults`, `channel[2]`).
pub(crate) fn apply(
    policy: &mut SandboxPolicy,
    image: Option<String>,
    root_inside: Option<bool>,
    at: &str,
) -> Result<(), PolicyError> {
    if let Some(name) = image {
        check_name(&name).map_err(|m| err(format!("{at}.image"), m))?;
        policy.image = Some(name);
    }
    if let Some(r) = root_inside {
        policy.root_inside = r;
    }
    Ok(())
}

/// The checks once a channel's keys are all known.
pub(crate) fn check(policy: &SandboxPolicy, at: &str) -> Result<(), PolicyError> {
    if policy.root_inside && policy.image.is_none() {
        return Err(err(
            format!("{at}.root_inside"),
            "needs an image (image = \"NAME\", see `moat image list`): root inside writes to a layer over the image, never over the host's /usr",
        ));
    }
    if policy.root_inside && policy.backend != crate::BackendKind::Bwrap {
        return Err(err(
            format!("{at}.root_inside"),
            format!(
                "is built for the bwrap backend so far (this channel's backend is {}); leave root_inside out or use backend = \"bwrap\"",
                policy.backend.name()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::GatewayConfig;

    fn channel(extra: &str) -> Result<GatewayConfig, PolicyError> {
        GatewayConfig::from_toml(&format!(
            "[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\"]\n{extra}\n"
        ))
    }

    #[test]
    fn image_keys_are_checked_naming_them() {
        let cfg = channel("image = \"dev\"").unwrap();
        assert_eq!(
            cfg.channels[0].sandbox_policy().image.as_deref(),
            Some("dev")
        );
        let e = channel("image = \"../etc\"").unwrap_err().to_string();
        assert!(e.contains("channel[0].image"), "{e}");
        let e = channel("root_inside = true").unwrap_err().to_string();
        assert!(
            e.contains("channel[0].root_inside") && e.contains("needs an image"),
            "{e}"
        );
        let cfg = channel("image = \"dev\"\nroot_inside = true").unwrap();
        assert!(cfg.channels[0].sandbox_policy().root_inside);
        let e = channel("image = \"dev\"\nroot_inside = true\nbackend = \"gvisor\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("channel[0].root_inside") && e.contains("bwrap"),
            "{e}"
        );
    }

    #[test]
    fn image_names() {
        for ok in ["bookworm", "dev-1.2", "a", "py_3"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "A", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}

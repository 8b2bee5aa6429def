//! A turn's workspace that starts with its channel's repository
//! (`github.clone`): cloned through the conversation's door (so with the
//! turn's token, never inside) into `/workspace/NAME`, on a branch made for
//! the conversation (`<branch_prefix><conversation>-<slug>`). A per-thread
//! conversation keeps its clone and branch across turns; a pooled turn
//! starts from the default branch each time (its workspace is reset).
//!
//! Must never: leave a half-made clone (it is made beside the target and
//! moved in only when complete), put message text into a command line (the
//! branch slug keeps only `[a-z0-9-]`, and values reach git through the
//! environment), or run the agent when the clone failed.

use moat_policy::github::ChannelGithub;
use moat_sandbox::{Lease, RunSpec, Stream};

/// What to clone where, for one turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClonePlan {
    /// `owner/name`.
    pub repo: String,
    /// The directory under `/workspace` (the repository's name).
    pub dir: String,
    /// 0: the whole history.
    pub depth: u32,
    pub branch: String,
}

/// At most this many characters of the message go into a branch name.
const SLUG_CHARS: usize = 30;

/// `[a-z0-9-]` words of `text`, joined by `-`, at most [`SLUG_CHARS`].
pub fn slug(text: &str) -> String {
    let mut out = String::new();
    for word in text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let w = word.to_ascii_lowercase();
        let room = SLUG_CHARS.saturating_sub(out.len() + usize::from(!out.is_empty()));
        if room == 0 {
            break;
        }
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(&w[..w.len().min(room)]);
    }
    if out.is_empty() {
        "work".to_string()
    } else {
        out
    }
}

/// The plan for a turn of `conversation` whose first message is `text`.
pub fn plan(g: &ChannelGithub, conversation: i64, text: &str) -> Option<ClonePlan> {
    let repo = g.clone.clone()?;
    let dir = repo.rsplit('/').next().unwrap_or("repo").to_string();
    Some(ClonePlan {
        repo,
        dir,
        depth: g.depth,
        branch: format!("{}{conversation}-{}", g.branch_prefix, slug(text)),
    })
}

/// The script run inside the sandbox; every value comes from the
/// environment.
const SCRIPT: &str = r#"set -u
dir="/workspace/$MOAT_CLONE_DIR"
if [ -e "$dir/.git" ]; then
    echo "kept"
    exit 0
fi
if [ -e "$dir" ]; then
    echo "moat: /workspace/$MOAT_CLONE_DIR exists and is not a git repository; the clone would overwrite it" >&2
    exit 3
fi
tmp="/workspace/.moat-clone-$$"
rm -rf "$tmp"
set -- clone -q --no-tags
if [ "$MOAT_CLONE_DEPTH" != 0 ]; then set -- "$@" --depth "$MOAT_CLONE_DEPTH"; fi
if ! git "$@" "https://github.com/$MOAT_CLONE_REPO.git" "$tmp"; then
    rm -rf "$tmp"
    exit 4
fi
if ! git -C "$tmp" checkout -q -b "$MOAT_CLONE_BRANCH"; then
    rm -rf "$tmp"
    exit 5
fi
mv "$tmp" "$dir" && echo "cloned"
"#;

/// What preparing the workspace did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    Cloned,
    /// A per-thread conversation's clone from an earlier turn.
    Kept,
}

/// Clones the plan's repository into the lease's workspace. `Err` is the
/// answer to give (the reason from git, bounded).
pub fn prepare(lease: &mut Lease, plan: &ClonePlan) -> Result<Prepared, String> {
    let mut spec = RunSpec::new(["/bin/sh", "-c", SCRIPT]);
    spec.env = vec![
        ("MOAT_CLONE_DIR".into(), plan.dir.clone()),
        ("MOAT_CLONE_REPO".into(), plan.repo.clone()),
        ("MOAT_CLONE_DEPTH".into(), plan.depth.to_string()),
        ("MOAT_CLONE_BRANCH".into(), plan.branch.clone()),
        ("GIT_TERMINAL_PROMPT".into(), "0".into()),
    ];
    spec.timeout = Some(std::time::Duration::from_secs(600));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let r = lease.run(spec, &mut |s, b| match s {
        Stream::Stdout if out.len() < 4096 => out.extend_from_slice(b),
        Stream::Stderr if err.len() < 4096 => err.extend_from_slice(b),
        _ => {}
    });
    let fail = |why: String| {
        let detail = String::from_utf8_lossy(&err).trim().to_string();
        if detail.is_empty() {
            why
        } else {
            format!("{why}:\n{detail}")
        }
    };
    match r {
        Err(e) => Err(format!("moat: could not clone {}: {e}", plan.repo)),
        Ok(o) => match o.reason() {
            None if String::from_utf8_lossy(&out).trim() == "kept" => Ok(Prepared::Kept),
            None => Ok(Prepared::Cloned),
            Some(r) => Err(fail(format!(
                "moat: could not clone {} into /workspace/{} ({r}); the agent did not run",
                plan.repo, plan.dir
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_keep_only_plain_words() {
        assert_eq!(slug("Fix the login bug!"), "fix-the-login-bug");
        assert_eq!(slug("$(rm -rf /); `x`"), "rm-rf-x");
        assert_eq!(slug("  "), "work");
        assert_eq!(slug("ünïcode only"), "n-code-only");
        let long = slug("a very long message that keeps going and going and going");
        assert!(long.len() <= SLUG_CHARS, "{long}");
        assert!(!long.ends_with('-'));
    }
}

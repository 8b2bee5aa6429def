//! The hand-back benchmark (`scripts/bench`; needs root for overlayfs). One
//! run, one machine, each number next to its baseline (docs/workspace.md):
//! - the hand-back walk over a workspace of N files, vs `find DIR -perm /6000`
//!   (the cost of merely looking at every entry's mode, which any setuid check
//!   must do);
//! - mounting and unmounting one socket-proof view (what a bwrap lease with a
//!   host workspace pays per start), vs a plain bind mount and unmount.
//!
//! Everything happens in a scratch directory under /tmp. Prints Markdown.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use moat_sandbox::handback::hand_back;
use moat_sandbox::view;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

/// `dirs` directories of `per_dir` files each, plus one nested repository.
fn tree(root: &Path, dirs: usize, per_dir: usize) {
    for d in 0..dirs {
        let dir = root.join(format!("d{d:05}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir {
            std::fs::write(dir.join(format!("f{f:04}.js")), b"x").unwrap();
        }
    }
    let git = root.join("vendor/lib/.git");
    std::fs::create_dir_all(git.join("hooks")).unwrap();
    std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(git.join("config"), "[core]\n\tbare = false\n").unwrap();
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let scratch = tempfile::Builder::new()
        .prefix("moat-bench-handback")
        .tempdir_in("/tmp")
        .unwrap();
    println!("| workspace | hand-back walk (median of 5) | `find DIR -perm /6000` (median of 5) | ratio |");
    println!("|---|---|---|---|");
    for (dirs, per_dir) in [(100, 100), (1000, 100)] {
        let root = scratch.path().join(format!("ws-{dirs}"));
        tree(&root, dirs, per_dir);
        let walk = time(5, || {
            let f = hand_back(&root, 0, &[], true);
            assert!(f.is_empty(), "{f:?}");
        });
        let find = time(5, || {
            let o = Command::new("find")
                .arg(&root)
                .arg("-printf")
                .arg("")
                .status()
                .unwrap();
            assert!(o.success());
        });
        println!(
            "| {} files | {} | {} | {:.2} |",
            dirs * per_dir,
            ms(walk),
            ms(find),
            walk.as_secs_f64() / find.as_secs_f64()
        );
    }
    let host = scratch.path().join("ws-100");
    let empty = scratch.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let at = scratch.path().join("view");
    let overlay = time(21, || {
        let v = view::mount(&host, true, &at, &empty, "bench").unwrap();
        drop(v);
    });
    let bind = time(21, || {
        std::fs::create_dir_all(&at).unwrap();
        nix::mount::mount(
            Some(&host),
            &at,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH).unwrap();
        std::fs::remove_dir(&at).unwrap();
    });
    println!();
    println!("| per lease start | median of 21 |");
    println!("|---|---|");
    println!(
        "| socket-proof view: mount + unmount (overlayfs, work directory made and removed) | {} |",
        ms(overlay)
    );
    println!("| plain bind mount + unmount (baseline) | {} |", ms(bind));
}

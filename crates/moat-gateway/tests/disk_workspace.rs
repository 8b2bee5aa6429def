//! A per-thread conversation on a channel with `disk = "..."` keeps its
//! workspace on a disk image (docs/workspaces.md): the files are there at the
//! next turn and after a restart of the gateway, the image lies under the
//! data directory, and nothing is mounted while no turn runs. Real bwrap
//! sandboxes, the real web chat on loopback.

mod gwkit;

use std::time::Duration;

use gwkit::*;

fn turn(gw: &Gw, thread: &str, cmd: &str, n: usize) -> String {
    let c = gw.client(None);
    assert_eq!(c.post(thread, cmd).status, 202);
    let mut sse = c.events(thread).expect("events");
    let evs = sse.until(Duration::from_secs(60), {
        let mut got = 0;
        move |v| {
            if v["type"] == "answer" {
                got += 1;
            }
            got == n
        }
    });
    let answers = answers_of(&evs);
    let (text, ok) = answers.last().cloned().expect("an answer");
    assert!(ok, "{text}");
    text
}

#[test]
fn a_per_thread_disk_workspace_survives_a_restart_of_the_gateway() {
    let toml = "[web]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [pool]\nsize = 0\n\n[[channel]]\nplatform = \"web\"\nid = \"*\"\nusers = [\"*\"]\n\
         debounce = \"0ms\"\nsandbox = \"per-thread\"\ndisk = \"256MiB\"\n";
    let data = fresh_dir("disk-ws").join("data");
    let gw = Gw::try_start_in(data.clone(), toml, Vec::new()).unwrap();
    let out = turn(
        &gw,
        "d1",
        "echo kept-$((6*7)) > /workspace/f; df -k /workspace | tail -1 | awk '{print \"size=\" $2}'",
        1,
    );
    // 256 MiB of ext4, not the 1 GiB tmpfs of before.
    let size: u64 = out
        .trim()
        .strip_prefix("size=")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!((200_000..=262_144).contains(&size), "{out:?}");
    let images: Vec<_> = std::fs::read_dir(data.join("disks"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "img"))
        .collect();
    assert_eq!(images.len(), 1, "one image for the conversation");
    let img = images[0].path();
    gw.stop();
    // Nothing of it is mounted once the gateway is gone.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(data.to_str().unwrap()), "a mount was left");
    let gw = Gw::try_start_in(data.clone(), toml, Vec::new()).unwrap();
    // The stream starts with the stored history (the first answer), then
    // this turn's.
    let out = turn(&gw, "d1", "cat /workspace/f", 2);
    assert_eq!(out.trim(), "kept-42");
    assert!(img.is_file());
    gw.stop();
}

//! `moat ipc-bridge`: the stdio side of moat's IPC endpoint, for agents that
//! start MCP servers as processes (Claude Code, Codex, Pi). Run inside a
//! sandbox, it copies standard input to `/run/moat/ipc.sock` and the
//! socket's answers to standard output, byte for byte (docs/ipc.md).
//!
//! Must never: add, change or read anything in the frames (who calls is the
//! lease's, decided on the host), or connect anywhere but the given socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Args)]
pub struct IpcBridgeArgs {
    /// The endpoint (inside a sandbox moat puts it here).
    #[arg(long, value_name = "PATH", default_value = "/run/moat/ipc.sock")]
    socket: PathBuf,
}

pub fn run(args: IpcBridgeArgs) -> ExitCode {
    let stream = match UnixStream::connect(&args.socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "moat ipc-bridge: cannot connect to {}: {e} (moat's tools exist only inside a gateway's sandbox, during a turn)",
                args.socket.display()
            );
            return ExitCode::from(1);
        }
    };
    let Ok(mut to_socket) = stream.try_clone() else {
        eprintln!("moat ipc-bridge: cannot duplicate the socket");
        return ExitCode::from(1);
    };
    // Answers to stdout on a thread of their own; the process ends when
    // the server closes the connection or stdin ends.
    let mut from_socket = stream;
    let out = std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        let mut stdout = std::io::stdout();
        loop {
            match from_socket.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout
                        .write_all(&buf[..n])
                        .and_then(|_| stdout.flush())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to_socket.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to_socket.shutdown(std::net::Shutdown::Write);
    let _ = out.join();
    ExitCode::SUCCESS
}

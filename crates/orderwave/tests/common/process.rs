//! The real binary as a process of its own.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_orderwave");

/// A running `orderwave serve`.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub stderr_path: PathBuf,
}

/// A test that fails part-way leaves no server behind.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Runs `command` (an `orderwave serve ...`), its stderr to `stderr_path`, and waits up to
    /// 30 s for its "listening on" line.
    pub fn spawn(mut command: Command, stderr_path: PathBuf) -> Server {
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn orderwave");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let base = loop {
            assert!(Instant::now() < deadline, "orderwave did not start");
            let line = lines
                .next()
                .unwrap_or_else(|| {
                    panic!(
                        "orderwave exited: {}",
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    )
                })
                .unwrap();
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.trim().to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            base,
            stderr_path,
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

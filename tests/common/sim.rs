//! `mesh lab sim` as a child process: its stdout lines, its stdin commands,
//! and SIGTERM (the simulated nodes leave) when dropped.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_lab::Lab;

pub struct Sim {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// Every line seen, for error messages.
    pub seen: Vec<String>,
}

impl Sim {
    /// Starts `mesh lab sim LAB --nodes N` and waits for its `ready:` line.
    pub fn start(lab: &Lab, nodes: usize, ready_within: Duration) -> Result<Sim> {
        let mut child = Command::new(super::mesh_bin())
            .args(["lab", "sim", &lab.name, "--nodes", &nodes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting mesh lab sim")?;
        let stdin = child.stdin.take().context("sim stdin")?;
        let stdout = child.stdout.take().context("sim stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut sim = Sim {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        };
        sim.wait_line("ready:", ready_within)?;
        Ok(sim)
    }

    /// The next line starting with `prefix`, within `limit`.
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "no {prefix:?} line from the simulator within {limit:?}; it printed: {}",
                    self.seen.join(" | ")
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!(
                    "the simulator ended before a {prefix:?} line; it printed: {}",
                    self.seen.join(" | ")
                ),
            }
        }
    }

    /// Sends one command line and returns the first line of its answer
    /// that starts with `answer`.
    pub fn command(&mut self, line: &str, answer: &str, limit: Duration) -> Result<String> {
        // What it printed before (an earlier `stats:` line) is no answer.
        while let Ok(old) = self.lines.try_recv() {
            self.seen.push(old);
        }
        writeln!(self.stdin, "{line}").context("writing to the simulator")?;
        self.stdin.flush()?;
        self.wait_line(answer, limit)
    }

    /// Silences `k` live nodes (`kill K`) and returns their node IDs.
    pub fn kill(&mut self, k: usize) -> Result<std::collections::BTreeSet<String>> {
        let line = self.command(&format!("kill {k}"), "killed", Duration::from_secs(60))?;
        Ok(line
            .split_once(':')
            .map(|(_, ids)| ids.split_whitespace().map(String::from).collect())
            .unwrap_or_default())
    }

    /// One `stats:` line as key → value.
    pub fn stats(&mut self) -> Result<std::collections::BTreeMap<String, i64>> {
        let line = self.command("stats", "stats:", Duration::from_secs(10))?;
        Ok(parse_stats(&line))
    }

    /// Interrupts it (the nodes leave the cluster) and waits for it.
    pub fn stop(mut self, limit: Duration) -> Result<()> {
        self.interrupt();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "the simulator exited with {status}: {}",
                        self.seen.join(" | ")
                    );
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        bail!(
            "the simulator did not stop within {limit:?}; it printed: {}",
            self.seen.join(" | ")
        )
    }

    fn interrupt(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.interrupt();
            for _ in 0..600 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `stats: a=1 b=2` → {a: 1, b: 2}.
pub fn parse_stats(line: &str) -> std::collections::BTreeMap<String, i64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

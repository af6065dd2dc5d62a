//! The node's side of `mesh service logs`: a stream of log requests kept
//! open to every manager, answered from the tasks' output files. The node
//! dials out only; it serves no port. The streams follow the set of
//! managers in [`Managers`]: a manager promoted later gets one as soon as a
//! heartbeat reply lists it, so `service logs` run there sees every node.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader};
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{Empty, LogChunk, LogLine, LogRequest};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::managers::Managers;
use crate::sandboxes::{Sandboxes, check_id};

/// Most lines per chunk.
pub const LINES_PER_CHUNK: usize = 2000;
/// A chunk stops growing past this many bytes of text: with the per-line
/// task and node names it stays well under gRPC's 4 MiB message limit.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Longer lines are cut into pieces of this size (Docker cuts at 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;
/// Read buffer per log file.
const READ_BUFFER: usize = 64 * 1024;

/// How often a stream that ended (its manager restarted) is opened again.
const REOPEN_EVERY: Duration = Duration::from_secs(2);

/// Keeps one request stream per known manager until `stop`.
pub async fn serve(
    managers: Managers,
    sandboxes: Arc<Sandboxes>,
    hostname: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut streams: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut set_changed = managers.subscribe();
    loop {
        let addrs = managers.addrs();
        streams.retain(|a, h| {
            let keep = addrs.contains(a) && !h.is_finished();
            if !keep {
                h.abort();
            }
            keep
        });
        for a in addrs {
            if let std::collections::hash_map::Entry::Vacant(slot) = streams.entry(a.clone()) {
                slot.insert(tokio::spawn(follow(
                    managers.clone(),
                    a,
                    sandboxes.clone(),
                    hostname.clone(),
                )));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REOPEN_EVERY) => {}
            // The sender lives as long as `managers`, which this holds.
            _ = set_changed.changed() => {}
            _ = stop.changed() => break,
        }
    }
    for h in streams.values() {
        h.abort();
    }
}

async fn follow(managers: Managers, addr: String, sandboxes: Arc<Sandboxes>, hostname: String) {
    let Ok(ch) = managers.channel_to(&addr) else {
        return;
    };
    let mut client = ClusterClient::new(ch);
    let mut stream = match client.log_requests(Empty {}).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            debug!(manager = %addr, "no log request stream: {}", s.message());
            return;
        }
    };
    while let Ok(Some(req)) = stream.message().await {
        answer(&mut client, &sandboxes, &hostname, req).await;
    }
}

/// Answers one request: each task's log is read and sent chunk by chunk,
/// never whole, then a last empty chunk says `done`.
async fn answer(
    client: &mut ClusterClient<tonic::transport::Channel>,
    sandboxes: &Sandboxes,
    hostname: &str,
    req: LogRequest,
) {
    let names: HashMap<String, String> = sandboxes
        .list()
        .into_iter()
        .map(|r| (r.id, r.name))
        .collect();
    for id in &req.task_ids {
        if let Err(e) = check_id(id) {
            warn!(request = %req.request_id, "log request: {e}");
            continue;
        }
        let task = names.get(id).cloned().unwrap_or_else(|| id.clone());
        let Some(path) = sandboxes.task_log_path(id) else {
            continue;
        };
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                debug!(task = %task, "cannot open {}: {e}", path.display());
                continue;
            }
        };
        let mut reader = LogChunks::new(BufReader::with_capacity(READ_BUFFER, file));
        loop {
            // The file is read off the async workers, one chunk at a time.
            let next = tokio::task::spawn_blocking(move || {
                let c = reader.next_chunk();
                (reader, c)
            })
            .await;
            let Ok((r, next)) = next else {
                return;
            };
            reader = r;
            let lines = match next {
                Ok(Some(lines)) => lines,
                Ok(None) => break,
                Err(e) => {
                    warn!(task = %task, "cannot read {}: {e}", path.display());
                    break;
                }
            };
            let chunk = LogChunk {
                request_id: req.request_id.clone(),
                lines: lines
                    .into_iter()
                    .map(|line| LogLine {
                        task: task.clone(),
                        node: hostname.to_string(),
                        line,
                        stderr: false,
                    })
                    .collect(),
                done: false,
            };
            // Waiting for each chunk's answer is the back-pressure that keeps
            // one chunk in memory at a time.
            if client.publish_logs(chunk).await.is_err() {
                return;
            }
        }
    }
    let last = LogChunk {
        request_id: req.request_id.clone(),
        lines: Vec::new(),
        done: true,
    };
    let _ = client.publish_logs(last).await;
}

/// A log read in bounded pieces: at most [`LINES_PER_CHUNK`] lines and about
/// [`CHUNK_BYTES`] per chunk, lines longer than [`MAX_LINE`] bytes split, so a
/// log of any size (even one endless line) is served in bounded memory.
pub struct LogChunks<R> {
    reader: R,
}

impl<R: BufRead> LogChunks<R> {
    pub fn new(reader: R) -> Self {
        Self { reader }
    }

    /// The next lines, without their line ends; None at the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<String>>> {
        let mut lines = Vec::new();
        let mut bytes = 0;
        while lines.len() < LINES_PER_CHUNK && bytes < CHUNK_BYTES {
            match self.next_line()? {
                Some(l) => {
                    bytes += l.len();
                    lines.push(l);
                }
                None => break,
            }
        }
        Ok((!lines.is_empty()).then_some(lines))
    }

    /// One line of at most [`MAX_LINE`] bytes; invalid UTF-8 is replaced.
    fn next_line(&mut self) -> io::Result<Option<String>> {
        let mut line: Vec<u8> = Vec::new();
        loop {
            let buf = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                // End of file: a last line without a newline still counts.
                return Ok((!line.is_empty()).then(|| text(line)));
            }
            let room = MAX_LINE - line.len();
            let window = &buf[..buf.len().min(room)];
            if let Some(end) = window.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&window[..end]);
                self.reader.consume(end + 1);
                return Ok(Some(text(line)));
            }
            let n = window.len();
            line.extend_from_slice(window);
            self.reader.consume(n);
            if line.len() >= MAX_LINE {
                // A newline right at the cut belongs to this piece, not to
                // an empty line after it.
                if self.reader.fill_buf()?.first() == Some(&b'\n') {
                    self.reader.consume(1);
                }
                return Ok(Some(text(line)));
            }
        }
    }
}

fn text(mut line: Vec<u8>) -> String {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn all(data: &[u8]) -> Vec<Vec<String>> {
        let mut r = LogChunks::new(BufReader::with_capacity(7, data));
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk().expect("read") {
            out.push(c);
        }
        out
    }

    #[test]
    fn lines_come_back_as_written() {
        assert!(all(b"").is_empty());
        assert_eq!(all(b"a\nbb\r\n\nlast"), [["a", "bb", "", "last"]]);
        assert_eq!(all(b"\xff\n"), [["\u{fffd}"]]);
    }

    #[test]
    fn long_lines_are_cut() {
        let mut data = vec![b'x'; MAX_LINE * 2];
        data.extend_from_slice(b"\ny\n");
        let chunks = all(&data);
        let lines: Vec<usize> = chunks.concat().iter().map(String::len).collect();
        assert_eq!(lines, [MAX_LINE, MAX_LINE, 1]);
    }

    #[test]
    fn a_big_log_file_is_served_in_bounded_chunks() {
        let path = std::env::temp_dir().join(format!("mesh-logchunks-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).expect("create");
        let n = LINES_PER_CHUNK * 5 + 3;
        for i in 0..n {
            writeln!(f, "line {i} {}", "z".repeat(i % 300)).expect("write");
        }
        drop(f);
        let file = std::fs::File::open(&path).expect("open");
        let mut r = LogChunks::new(BufReader::new(file));
        let mut seen = 0;
        while let Some(c) = r.next_chunk().expect("read") {
            assert!(c.len() <= LINES_PER_CHUNK);
            assert!(c.iter().map(String::len).sum::<usize>() < CHUNK_BYTES + MAX_LINE);
            for l in &c {
                assert!(l.starts_with(&format!("line {seen} ")), "{l}");
                seen += 1;
            }
        }
        assert_eq!(seen, n);
        let _ = std::fs::remove_file(&path);
    }

    /// Endless input cannot be read whole: each chunk still ends.
    #[test]
    fn endless_input_still_gives_bounded_chunks() {
        let mut one_line = LogChunks::new(BufReader::new(io::repeat(b'a')));
        let c = one_line.next_chunk().expect("read").expect("chunk");
        assert!(c.iter().all(|l| l.len() == MAX_LINE));
        assert!(c.iter().map(String::len).sum::<usize>() < CHUNK_BYTES + MAX_LINE);
        let mut empty_lines = LogChunks::new(BufReader::new(io::repeat(b'\n')));
        let c = empty_lines.next_chunk().expect("read").expect("chunk");
        assert_eq!(c.len(), LINES_PER_CHUNK);
    }
}

//! The embedded DNS server on real namespaces (needs root), queried with
//! `dig` from inside the sandbox's namespace.
//!
//! Namespaces are named `t<pid>-...`, made by the test and deleted on drop.
//! The "host's resolvers" are fake servers on 127.0.0.1 in the test process's
//! own namespace, where the daemon forwards from; nothing leaves the machine.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use mesh_worker::dns::{DnsServer, NetworkRecords, Records, SandboxNetwork};
use mesh_worker::netns;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces: run them as root"
    );
}

/// A named network namespace, deleted on drop. Made with `netns::create`,
/// which leaves `lo` down, so the server's own loopback setup is tested.
struct Netns(String);

impl Netns {
    fn new(suffix: &str) -> Self {
        let name = format!("t{}-{suffix}", std::process::id());
        let _ = netns::delete(&name);
        netns::create(&name).expect("create netns");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = netns::delete(&self.0) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A background task, aborted on drop.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The fake upstream's answer to one query: `example.test A 192.0.2.10`,
/// `big.test` with 100 A records (too big for plain UDP: sent truncated
/// over UDP), NXDOMAIN for anything else.
fn upstream_reply(query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    let question = q.queries.first()?.clone();
    let name = question.name().clone();
    let qname = name.to_ascii().to_ascii_lowercase();
    r.add_query(question.clone());
    match (qname.as_str(), question.query_type()) {
        ("example.test.", RecordType::A) => {
            r.add_answer(Record::from_rdata(
                name,
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 10))),
            ));
        }
        ("big.test.", RecordType::A) if udp => r.metadata.truncation = true,
        ("big.test.", RecordType::A) => {
            for i in 0..100u8 {
                r.add_answer(Record::from_rdata(
                    name.clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(198, 51, 100, i))),
                ));
            }
        }
        _ => r.metadata.response_code = ResponseCode::NXDomain,
    }
    r.to_vec().ok()
}

/// A fake upstream resolver on 127.0.0.1 (UDP and TCP on one port). Counts
/// the queries it gets: TCP ones to see the fallback after truncation, all
/// of them to see that nothing came.
struct Upstream {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
    _tasks: (Task, Task),
}

async fn start_upstream() -> Upstream {
    // UDP first, then TCP on the same port; retry if that port is taken.
    let (udp, tcp) = loop {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind udp");
        let addr = udp.local_addr().expect("udp addr");
        if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().expect("udp addr");
    let udp_queries = Arc::new(AtomicUsize::new(0));
    let udp_counter = udp_queries.clone();
    let udp_task = Task(tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            udp_counter.fetch_add(1, Ordering::SeqCst);
            if let Some(reply) = upstream_reply(&buf[..n], true) {
                let _ = udp.send_to(&reply, peer).await;
            }
        }
    }));
    let tcp_queries = Arc::new(AtomicUsize::new(0));
    let counter = tcp_queries.clone();
    let tcp_task = Task(tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = tcp.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                while s.read_exact(&mut len).await.is_ok() {
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let Some(reply) = upstream_reply(&q, false) else {
                        return;
                    };
                    let Ok(rlen) = u16::try_from(reply.len()) else {
                        return;
                    };
                    let mut out = rlen.to_be_bytes().to_vec();
                    out.extend_from_slice(&reply);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    }));
    Upstream {
        addr,
        udp_queries,
        tcp_queries,
        _tasks: (udp_task, tcp_task),
    }
}

/// What dig saw: the status and the answer section's data.
#[derive(Debug)]
struct Dig {
    ok: bool,
    status: Option<String>,
    answers: Vec<String>,
    output: String,
}

/// Runs `dig @127.0.0.11 ARGS` inside `ns`, one try.
async fn dig(ns: &str, args: &[&str]) -> Dig {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "dig",
            "@127.0.0.11",
            "+tries=1",
            "+timeout=3",
        ])
        .args(["+noall", "+comments", "+answer"])
        .args(args)
        .output()
        .await
        .expect("run dig (apt-get install dnsutils)");
    let output =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let status = output.lines().find_map(|l| {
        let rest = l.split("status: ").nth(1)?;
        Some(rest.split(',').next()?.trim().to_string())
    });
    let answers = output
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    Dig {
        ok: out.status.success(),
        status,
        answers,
        output,
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn records(web: &str) -> Records {
    let mut n1 = NetworkRecords::new("n1");
    n1.insert_sandbox("web", ip(web));
    n1.insert_alias("w", ip(web));
    let mut n2 = NetworkRecords::new("n2");
    n2.insert_sandbox("db", ip("10.0.2.5"));
    let mut r = Records::default();
    r.networks.insert("n1".into(), n1);
    r.networks.insert("n2".into(), n2);
    r
}

/// Non-internal networks.
fn nets(ids: &[&str]) -> Vec<SandboxNetwork> {
    ids.iter().map(|s| SandboxNetwork::new(*s, false)).collect()
}

#[track_caller]
fn expect(d: &Dig, status: &str, answers: &[&str]) {
    assert_eq!(d.status.as_deref(), Some(status), "{}", d.output);
    assert_eq!(d.answers, answers, "{}", d.output);
}

/// Sends junk to the resolver from inside `ns`: short, header-only and
/// random-ish datagrams, and over TCP a bogus length prefix, a huge one
/// followed by a hang-up, and raw junk.
fn send_garbage(ns: &str) {
    netns::run_in(ns, || {
        let server = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 11), 53));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let noise: Vec<u8> = (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let header_only = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        let lying_counts = [
            0x12, 0x35, 0x01, 0x00, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 3,
        ];
        for junk in [
            &[0u8][..],
            &[0xff; 5][..],
            &header_only[..],
            &lying_counts[..],
            &noise[..],
            &noise[..512],
        ] {
            udp.send_to(junk, server).expect("send junk");
        }

        for junk in [
            [&[0x00, 0x05][..], &[1, 2, 3, 4, 5][..]].concat(),
            [&[0xff, 0xff][..], &noise[..100]].concat(),
            noise[..700].to_vec(),
            [&[0x00, 0x0d][..], &lying_counts[..]].concat(),
        ] {
            let mut s = std::net::TcpStream::connect(server).expect("connect tcp");
            let _ = s.write_all(&junk);
            let _ = s.shutdown(std::net::Shutdown::Write);
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    })
    .expect("enter netns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_resolver_answers_forwards_and_survives_garbage() {
    require_root();
    let ns = Netns::new("sb");
    let upstream = start_upstream().await;
    let server = DnsServer::new(vec![upstream.addr], Duration::from_secs(2));
    server.set_records(records("10.0.1.2"));
    server
        .serve_sandbox("sb1", &ns.0, nets(&["n1"]))
        .await
        .expect("serve sandbox");
    // Idempotent.
    server
        .serve_sandbox("sb1", &ns.0, nets(&["n1"]))
        .await
        .expect("serve sandbox again");
    assert_eq!(server.served(), vec!["sb1".to_string()]);

    expect(&dig(&ns.0, &["web"]).await, "NOERROR", &["10.0.1.2"]);
    expect(&dig(&ns.0, &["WEB."]).await, "NOERROR", &["10.0.1.2"]);
    expect(&dig(&ns.0, &["w"]).await, "NOERROR", &["10.0.1.2"]);
    expect(&dig(&ns.0, &["tasks.web"]).await, "NOERROR", &["10.0.1.2"]);
    expect(&dig(&ns.0, &["db"]).await, "NXDOMAIN", &[]);
    expect(&dig(&ns.0, &["nosuch"]).await, "NXDOMAIN", &[]);
    expect(&dig(&ns.0, &["web", "AAAA"]).await, "NOERROR", &[]);
    expect(&dig(&ns.0, &["-x", "10.0.1.2"]).await, "NOERROR", &["web."]);
    expect(
        &dig(&ns.0, &["+tcp", "web"]).await,
        "NOERROR",
        &["10.0.1.2"],
    );

    // Forwarded, over UDP and TCP; an upstream NXDOMAIN is relayed.
    expect(
        &dig(&ns.0, &["example.test"]).await,
        "NOERROR",
        &["192.0.2.10"],
    );
    expect(
        &dig(&ns.0, &["+tcp", "example.test"]).await,
        "NOERROR",
        &["192.0.2.10"],
    );
    expect(&dig(&ns.0, &["other.test"]).await, "NXDOMAIN", &[]);
    // Truncated upstream UDP reply: we ask upstream again over TCP and relay
    // the full answer over UDP (dig offers a 4 KiB buffer, so it need not
    // fall back to TCP itself).
    let before = upstream.tcp_queries.load(Ordering::SeqCst);
    let big = dig(&ns.0, &["+bufsize=4096", "big.test"]).await;
    assert_eq!(big.status.as_deref(), Some("NOERROR"), "{}", big.output);
    assert_eq!(big.answers.len(), 100, "{}", big.output);
    assert!(!big.output.contains("Truncated"), "{}", big.output);
    assert_eq!(upstream.tcp_queries.load(Ordering::SeqCst), before + 1);
    // A client with the default 1232-byte buffer gets TC from us and
    // retries over TCP, which we forward over TCP.
    let big = dig(&ns.0, &["big.test"]).await;
    assert_eq!(big.answers.len(), 100, "{}", big.output);

    // Junk does not take the server down.
    send_garbage(&ns.0);
    expect(&dig(&ns.0, &["web"]).await, "NOERROR", &["10.0.1.2"]);
    expect(&dig(&ns.0, &["+tcp", "w"]).await, "NOERROR", &["10.0.1.2"]);

    // New records are seen at once.
    server.set_records(records("10.0.1.9"));
    expect(&dig(&ns.0, &["web"]).await, "NOERROR", &["10.0.1.9"]);
    expect(&dig(&ns.0, &["-x", "10.0.1.9"]).await, "NOERROR", &["web."]);

    // Attaching to n2 makes db visible.
    server.update_sandbox_networks("sb1", nets(&["n1", "n2"]));
    expect(&dig(&ns.0, &["db"]).await, "NOERROR", &["10.0.2.5"]);
    server.update_sandbox_networks("sb1", nets(&["n1"]));
    expect(&dig(&ns.0, &["db"]).await, "NXDOMAIN", &[]);

    // Stopped: nothing listens any more.
    server.stop_sandbox("sb1").await;
    assert!(server.served().is_empty());
    let gone = dig(&ns.0, &["web"]).await;
    assert!(!gone.ok && gone.status.is_none(), "{}", gone.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_gives_servfail_and_floods_stay_bounded() {
    require_root();
    let ns = Netns::new("sb2");
    // Bound and never read: queries to it just time out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind silent");
    let timeout = Duration::from_secs(1);
    let server = DnsServer::new(vec![silent.local_addr().expect("addr")], timeout);
    server.set_records(records("10.0.1.2"));
    server
        .serve_sandbox("sb2", &ns.0, nets(&["n1"]))
        .await
        .expect("serve sandbox");

    // dig's own +timeout=3 bounds a hang: a SERVFAIL status means the
    // server answered after its upstream timed out, rather than never.
    let d = dig(&ns.0, &["example.test"]).await;
    expect(&d, "SERVFAIL", &[]);

    // A flood of forwarded queries (far more than the in-flight cap, each
    // stuck on the silent upstream) does not stop local answers.
    netns::run_in(&ns.0, || {
        let server = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 11), 53));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        for i in 0..2000u16 {
            let mut q = Message::query();
            q.metadata.id = i;
            q.metadata.recursion_desired = true;
            let name = format!("n{i}.flood.test.");
            q.add_query(hickory_proto::op::Query::query(
                name.parse().expect("name"),
                RecordType::A,
            ));
            let bytes = q.to_vec().expect("encode");
            let _ = udp.send_to(&bytes, server);
        }
    })
    .expect("enter netns");
    // The flood can still fill the socket's receive buffer when dig sends,
    // and the kernel then drops dig's datagram as it drops the flood's: a
    // client retries, so this one does too (three tries of a second each).
    expect(
        &dig(&ns.0, &["+tries=3", "+timeout=1", "web"]).await,
        "NOERROR",
        &["10.0.1.2"],
    );

    server.stop_sandbox("sb2").await;
    drop(silent);
}

impl Upstream {
    fn queries(&self) -> usize {
        self.udp_queries.load(Ordering::SeqCst) + self.tcp_queries.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_only_sandbox_is_refused_and_nothing_goes_upstream() {
    require_root();
    let ns = Netns::new("sb3");
    let upstream = start_upstream().await;
    let server = DnsServer::new(vec![upstream.addr], Duration::from_secs(2));
    server.set_records(records("10.0.1.2"));
    let sealed = vec![SandboxNetwork::new("n1", true)];
    server
        .serve_sandbox("sb3", &ns.0, sealed.clone())
        .await
        .expect("serve sandbox");

    // Everything that would go upstream is refused, over UDP and TCP,
    // forward and reverse, any class.
    for args in [
        &["example.test"][..],
        &["+tcp", "example.test"],
        &["data-to-leak.example.test", "TXT"],
        &["-x", "192.0.2.10"],
        &["-c", "CH", "version.bind", "TXT"],
    ] {
        expect(&dig(&ns.0, args).await, "REFUSED", &[]);
    }
    assert_eq!(
        upstream.queries(),
        0,
        "an internal-only sandbox reached upstream"
    );
    // Its own networks' names still answer.
    expect(&dig(&ns.0, &["web"]).await, "NOERROR", &["10.0.1.2"]);
    expect(&dig(&ns.0, &["+tcp", "w"]).await, "NOERROR", &["10.0.1.2"]);
    expect(&dig(&ns.0, &["db"]).await, "NXDOMAIN", &[]);

    // On one network with egress too, it forwards (so the above can fail).
    server.update_sandbox_networks(
        "sb3",
        vec![
            SandboxNetwork::new("n1", true),
            SandboxNetwork::new("n2", false),
        ],
    );
    expect(
        &dig(&ns.0, &["example.test"]).await,
        "NOERROR",
        &["192.0.2.10"],
    );
    assert_eq!(upstream.queries(), 1);
    // And back: refused again, nothing more upstream.
    server.update_sandbox_networks("sb3", sealed);
    expect(&dig(&ns.0, &["+tcp", "example.test"]).await, "REFUSED", &[]);
    assert_eq!(upstream.queries(), 1);

    server.stop_sandbox("sb3").await;
}

/// Opens N TCP connections to the resolver (see the script).
const TCP_HOG: &str = include_str!("tcp_hog.py");

/// Server-side TCP sockets of the DNS server in `ns` (local port 53), as
/// the kernel lists them: each is one descriptor held by the server. Counted
/// in the namespace rather than in /proc/self/fd, since other tests of this
/// binary open descriptors in the same process at the same time.
fn server_sockets(ns: &str) -> usize {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ss",
            "-Htn",
            "state",
            "established",
            "sport",
            "= :53",
        ])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Reads the hog's "opened open" line.
async fn hog_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> (usize, usize) {
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("hog answers in time")
        .expect("read hog")
        .expect("hog line");
    let mut words = line
        .split_whitespace()
        .map(|w| w.parse::<usize>().expect("number"));
    let (Some(opened), Some(open)) = (words.next(), words.next()) else {
        panic!("hog said {line:?}");
    };
    (opened, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_per_sandbox_are_capped() {
    use mesh_worker::dns::{MAX_TCP_CONNECTIONS, TCP_IDLE};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    require_root();
    let ns = Netns::new("sb4");
    let upstream = start_upstream().await;
    let server = DnsServer::new(vec![upstream.addr], Duration::from_secs(2));
    server.set_records(records("10.0.1.2"));
    server
        .serve_sandbox("sb4", &ns.0, nets(&["n1"]))
        .await
        .expect("serve sandbox");
    expect(
        &dig(&ns.0, &["+tcp", "web"]).await,
        "NOERROR",
        &["10.0.1.2"],
    );
    let before = server_sockets(&ns.0);

    const CLIENTS: usize = 300;
    let mut hog = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c", TCP_HOG])
        .arg(CLIENTS.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run python3");
    let mut stdin = hog.stdin.take().expect("hog stdin");
    let mut lines = tokio::io::BufReader::new(hog.stdout.take().expect("hog stdout")).lines();

    let (opened, open) = hog_line(&mut lines).await;
    let during = server_sockets(&ns.0);
    println!("{opened} connections made, {open} still open; server sockets {before} -> {during}");
    assert_eq!(
        opened, CLIENTS,
        "the excess is accepted (then closed), not left hanging"
    );
    assert!(
        (1..=MAX_TCP_CONNECTIONS).contains(&open),
        "{open} of {opened} connections open, cap {MAX_TCP_CONNECTIONS}"
    );
    // Uncapped, the server kept one socket per connection.
    assert!(
        during <= before + MAX_TCP_CONNECTIONS,
        "server sockets {before} -> {during} with {open} connections open"
    );

    // The ones kept are closed once idle.
    tokio::time::sleep(TCP_IDLE + Duration::from_secs(1)).await;
    stdin.write_all(b"\n").await.expect("poke hog");
    let (_, open) = hog_line(&mut lines).await;
    assert_eq!(open, 0, "idle connections are closed after {TCP_IDLE:?}");
    let after = server_sockets(&ns.0);
    assert!(after <= before, "{after} server sockets left");
    drop(stdin);
    let _ = hog.wait().await;

    // The slots are free again.
    expect(
        &dig(&ns.0, &["+tcp", "web"]).await,
        "NOERROR",
        &["10.0.1.2"],
    );
    expect(
        &dig(&ns.0, &["+tcp", "example.test"]).await,
        "NOERROR",
        &["192.0.2.10"],
    );
    server.stop_sandbox("sb4").await;
}

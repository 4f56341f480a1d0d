//! `grove`: the command line of Grove's node agent. Tables for people, `--json` for
//! scripts. `grove --help` lists the commands.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use grove_agentd::client::{self, Clients};
use grove_proto::v1 as pb;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "grove", version, about = "Grove's CLI: templates, sandboxes, snapshots, forks")]
struct Cli {
    /// unix:PATH or http(s)://HOST:PORT.
    #[arg(long, global = true, env = "GROVE_ENDPOINT", default_value = client::DEFAULT_ENDPOINT)]
    endpoint: String,
    /// File with the bearer token (TCP endpoints).
    #[arg(long, global = true, env = "GROVE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Templates: add, warm, ls, rm.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Create a sandbox; prints its id.
    Create {
        /// From this template.
        #[arg(long, conflicts_with = "snapshot", required_unless_present = "snapshot")]
        template: Option<String>,
        /// From this snapshot.
        #[arg(long)]
        snapshot: Option<u64>,
        /// A label, k=v (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// vCPUs (default: the template's).
        #[arg(long, default_value_t = 0)]
        vcpus: u32,
        /// Memory in MiB (default: the template's).
        #[arg(long, default_value_t = 0)]
        memory_mib: u32,
        /// Delete it after this many seconds.
        #[arg(long, default_value_t = 0)]
        ttl: u32,
    },
    /// List sandboxes.
    Ls {
        /// Only those with this label, k=v (repeatable: all must match).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Only those in this state (repeatable).
        #[arg(long = "state")]
        states: Vec<String>,
    },
    /// Show one sandbox.
    Get { id: String },
    /// Pause a sandbox.
    Pause { id: String },
    /// Resume a sandbox.
    Resume { id: String },
    /// Snapshot a sandbox (durable); prints the snapshot id.
    Snapshot {
        id: String,
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Delete sandboxes.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Also every descendant (prints the ids deleted).
        #[arg(long)]
        subtree: bool,
    },
    /// Show a sandbox's fork tree below it (and its ancestors).
    Tree { id: String },
    /// Keep one child of a fork and delete its siblings with their subtrees; prints the ids
    /// deleted.
    Keep { id: String },
    /// Set the TTL (seconds from now; 0 clears it) of a sandbox, or of its whole subtree.
    Ttl {
        id: String,
        seconds: u32,
        #[arg(long)]
        subtree: bool,
    },
    /// Restore a sandbox in place to an earlier snapshot of its history.
    Rewind { id: String, snapshot: u64 },
    /// Run a command in a sandbox (its template needs --guest-agent): output streams out,
    /// the exit status becomes grove's (128+N for signal N).
    Exec {
        id: String,
        /// Feed grove's stdin to the command.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// On a PTY the size of grove's terminal, the terminal in raw mode (implies -i).
        #[arg(short = 't', long)]
        tty: bool,
        /// An environment variable, K=V (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_label)]
        env: Vec<(String, String)>,
        /// Working directory in the guest.
        #[arg(long, default_value = "")]
        cwd: String,
        /// User name or uid in the guest.
        #[arg(long, short = 'u', default_value = "")]
        user: String,
        /// Kill it after this many seconds.
        #[arg(long, default_value_t = 0)]
        timeout: u32,
        /// Snapshot the sandbox once the command exits (a checkpoint for `grove rewind`);
        /// prints `checkpoint N` on stderr.
        #[arg(long)]
        checkpoint: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Copy a file into or out of a sandbox: `grove cp LOCAL ID:/path` or `grove cp ID:/path
    /// LOCAL` (`-` is stdin or stdout).
    Cp {
        src: String,
        dst: String,
        /// Create missing parent directories in the guest.
        #[arg(long, short = 'p')]
        parents: bool,
    },
    /// Processes started through agentd (of one sandbox, or all).
    Ps { id: Option<String> },
    /// Attach to a running or ended process (from another terminal, after a disconnect):
    /// its kept output from SEQ on, then the rest; exits with its status.
    Attach {
        process_id: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Wait until a process ends; exits with its status.
    Wait { process_id: String },
    /// Send a signal (a number, default 15) to a process.
    Kill {
        process_id: String,
        #[arg(long, short = 's', default_value_t = 15)]
        signal: i32,
    },
    /// Fork a running sandbox into N children; prints their ids. With `-- CMD…` or `--run
    /// LINE` (guest agent needed) each child runs CMD as it starts (with GROVE_CHILD_INDEX and
    /// GROVE_SANDBOX_ID set): its output is printed line by line as `[INDEX] …`, then one
    /// line per child with its id and exit; grove exits 0 if every child's CMD exited 0.
    Fork {
        id: String,
        #[arg(long, short = 'n')]
        count: u32,
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// An environment variable of every child's CMD, K=V (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_label)]
        env: Vec<(String, String)>,
        /// An environment variable of one child's CMD, INDEX:K=V (repeatable).
        #[arg(long = "child-env", value_parser = parse_child_env)]
        child_env: Vec<(usize, String, String)>,
        /// Deterministic children: each keeps the snapshot's clock and RNG state (default:
        /// each gets the host's clock and fresh entropy).
        #[arg(long)]
        deterministic: bool,
        /// The command each child runs, as one shell line (`sh -c LINE`).
        #[arg(long, conflicts_with = "cmd")]
        run: Option<String>,
        /// The command each child runs, as its argv.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Stream the changes to a directory's entries in a sandbox (not recursive), one line
    /// each (`created|modified|removed|renamed-from|renamed-to PATH[/]`), until interrupted.
    WatchDir { id: String, dir: String },
    /// Stream lifecycle events (of one sandbox, or all).
    Watch {
        id: Option<String>,
        /// Start with one line per existing sandbox.
        #[arg(long)]
        current: bool,
    },
    /// Snapshots: ls, rm.
    #[command(subcommand)]
    Snapshots(SnapshotsCmd),
    /// The node.
    #[command(subcommand)]
    Node(NodeCmd),
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Register a template (paths on agentd's host).
    Add {
        name: String,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long, default_value = "")]
        cmdline: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 256)]
        memory_mib: u32,
        /// A raw root filesystem image.
        #[arg(long, conflicts_with = "rootfs_dir")]
        rootfs_image: Option<PathBuf>,
        /// A directory made into an ext4 root disk.
        #[arg(long)]
        rootfs_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        disk_mib: u32,
        /// Ready check: `boot-timer` (guest-init) or `serial:TEXT` (e.g. serial:READY).
        #[arg(long, default_value = "boot-timer")]
        ready: String,
        /// Seconds a warm-up boot may take.
        #[arg(long, default_value_t = 0)]
        ready_timeout: u32,
        /// The guest runs guest-init's agent (vsock port 1024): `grove exec` works in its
        /// sandboxes.
        #[arg(long)]
        guest_agent: bool,
    },
    /// Boot once, wait until ready, snapshot: later creates restore.
    Warm { name: String },
    /// List templates.
    Ls,
    /// Delete a template (refused while sandboxes use it).
    Rm { name: String },
}

#[derive(Subcommand)]
enum SnapshotsCmd {
    /// List snapshots.
    Ls,
    /// Delete a snapshot (refused while in use).
    Rm { id: u64 },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Host check, capacity, versions, standby pools.
    Info,
    /// Prometheus metrics text.
    Metrics,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?}: expected k=v"))
}

fn parse_child_env(s: &str) -> Result<(usize, String, String), String> {
    let (i, kv) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected INDEX:K=V"))?;
    let i = i.parse().map_err(|_| format!("{s:?}: INDEX is a number"))?;
    let (k, v) = parse_label(kv)?;
    Ok((i, k, v))
}

fn labels(v: &[(String, String)]) -> HashMap<String, String> {
    v.iter().cloned().collect()
}

fn state_name(s: i32) -> String {
    pb::SandboxState::try_from(s)
        .map(|s| s.as_str_name().trim_start_matches("SANDBOX_STATE_").to_lowercase())
        .unwrap_or_else(|_| s.to_string())
}

fn parse_state(s: &str) -> Result<i32, String> {
    pb::SandboxState::from_str_name(&format!("SANDBOX_STATE_{}", s.to_uppercase()))
        .map(Into::into)
        .ok_or_else(|| {
            format!(
                "unknown state {s:?} (creating, running, paused, snapshotting, stopped, failed)"
            )
        })
}

fn sorted(m: &HashMap<String, String>) -> Vec<(&String, &String)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort();
    v
}

fn labels_text(m: &HashMap<String, String>) -> String {
    sorted(m).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn sandbox_json(s: &pb::Sandbox) -> Value {
    json!({
        "id": s.id, "state": state_name(s.state), "reason": s.reason, "template": s.template,
        "from_snapshot": s.from_snapshot, "parent": s.parent, "labels": s.labels,
        "vcpus": s.vcpus, "memory_mib": s.memory_mib, "created_unix_ms": s.created_unix_ms,
        "expires_unix_ms": s.expires_unix_ms, "identity": s.identity, "vmm_pid": s.vmm_pid,
        "disk_layer": s.disk_layer, "disk_attached": s.disk_attached,
        "children": s.children, "ancestors": s.ancestors,
    })
}

fn template_json(t: &pb::Template) -> Value {
    json!({
        "name": t.name, "kernel": t.kernel, "has_initrd": t.has_initrd, "cmdline": t.cmdline,
        "vcpus": t.vcpus, "memory_mib": t.memory_mib, "base_layer": t.base_layer,
        "disk_bytes": t.disk_bytes, "ready_text": t.ready_text, "snapshot": t.snapshot,
        "created_unix_ms": t.created_unix_ms, "sandboxes": t.sandboxes,
        "guest_agent": t.guest_agent,
    })
}

fn snapshot_json(s: &pb::SnapshotInfo) -> Value {
    json!({
        "id": s.id, "parent": s.parent, "sandbox": s.sandbox, "labels": s.labels,
        "vcpus": s.vcpus, "memory_mib": s.memory_mib, "depth": s.depth, "pages": s.pages,
        "pause_ms": s.pause_ms, "created_unix_ms": s.created_unix_ms, "refs": s.refs,
    })
}

/// Prints rows as aligned columns.
fn table(head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head.iter().map(|h| (*h).to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn sandbox_row(s: &pb::Sandbox) -> Vec<String> {
    vec![
        s.id.clone(),
        state_name(s.state),
        if s.template.is_empty() {
            format!("snapshot {}", s.from_snapshot)
        } else {
            s.template.clone()
        },
        format!("{}x{}M", s.vcpus, s.memory_mib),
        if s.vmm_pid == 0 { "-".into() } else { s.vmm_pid.to_string() },
        labels_text(&s.labels),
        s.reason.clone(),
    ]
}

const SANDBOX_HEAD: [&str; 7] = ["ID", "STATE", "FROM", "SHAPE", "PID", "LABELS", "REASON"];

fn print_sandboxes(json_out: bool, v: &[pb::Sandbox]) {
    if json_out {
        println!("{}", Value::Array(v.iter().map(sandbox_json).collect()));
    } else {
        table(&SANDBOX_HEAD, &v.iter().map(sandbox_row).collect::<Vec<_>>());
    }
}

fn print_sandbox(json_out: bool, s: &pb::Sandbox) {
    if json_out {
        println!("{}", sandbox_json(s));
    } else {
        table(&SANDBOX_HEAD, &[sandbox_row(s)]);
    }
}

fn print_ids(json_out: bool, show: bool, ids: &[String]) {
    if json_out {
        println!("{}", json!({ "deleted": ids }));
    } else if show {
        for id in ids {
            println!("{id}");
        }
    }
}

/// A sandbox and the subtrees of its children.
struct Tree {
    node: pb::Sandbox,
    children: Vec<Tree>,
}

/// Fetches the tree below `root` (Get per descendant; one gone meanwhile is left out).
async fn subtree(c: &mut Clients, root: pb::Sandbox) -> Result<Tree, tonic::Status> {
    let mut out = Tree { node: root, children: Vec::new() };
    // Depth first with an explicit stack of paths into `out`.
    let mut stack: Vec<Vec<usize>> = vec![Vec::new()];
    while let Some(path) = stack.pop() {
        let mut at = &mut out;
        for &i in &path {
            at = &mut at.children[i];
        }
        for id in at.node.children.clone() {
            match c.sandbox.get(pb::GetRequest { id }).await {
                Ok(s) => {
                    at.children.push(Tree { node: s.into_inner(), children: Vec::new() });
                    let mut p = path.clone();
                    p.push(at.children.len() - 1);
                    stack.push(p);
                }
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

fn tree_json(t: &Tree) -> Value {
    let mut v = sandbox_json(&t.node);
    v["subtree"] = Value::Array(t.children.iter().map(tree_json).collect());
    v
}

fn print_tree(t: &Tree, first: &str, rest: &str) {
    let s = &t.node;
    let pid = if s.vmm_pid == 0 { "-".to_string() } else { s.vmm_pid.to_string() };
    let line =
        format!("{first}{} {} pid {pid} {}", s.id, state_name(s.state), labels_text(&s.labels));
    println!("{}", line.trim_end());
    for (i, ch) in t.children.iter().enumerate() {
        let last = i + 1 == t.children.len();
        let (f, r) = if last { ("└─ ", "   ") } else { ("├─ ", "│  ") };
        print_tree(ch, &format!("{rest}{f}"), &format!("{rest}{r}"));
    }
}

/// The terminal in raw mode while a `-t` exec runs (restored on drop).
struct RawTerminal(Option<rustix::termios::Termios>);

impl RawTerminal {
    fn enter() -> Self {
        let fd = rustix::stdio::stdin();
        let Ok(old) = rustix::termios::tcgetattr(fd) else { return Self(None) };
        let mut raw = old.clone();
        raw.make_raw();
        if rustix::termios::tcsetattr(fd, rustix::termios::OptionalActions::Now, &raw).is_err() {
            return Self(None);
        }
        Self(Some(old))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let fd = rustix::stdio::stdin();
            let _ = rustix::termios::tcsetattr(fd, rustix::termios::OptionalActions::Now, old);
        }
    }
}

type ProcessClient = pb::process_service_client::ProcessServiceClient<client::AuthChannel>;

/// The size of grove's terminal (rows, columns), if stdout is one.
fn terminal_size() -> Option<(u32, u32)> {
    rustix::termios::tcgetwinsize(rustix::stdio::stdout())
        .ok()
        .map(|w| (u32::from(w.ws_row.max(1)), u32::from(w.ws_col.max(1))))
}

/// Feeds grove's stdin to the process (its end: end of input).
fn feed_stdin(mut pc: ProcessClient, process_id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = stdin.read(&mut buf).await.unwrap_or(0);
            let req = pb::SendStdinRequest {
                process_id: process_id.clone(),
                data: buf[..n].to_vec(),
                eof: n == 0,
            };
            if pc.send_stdin(req).await.is_err() || n == 0 {
                return;
            }
        }
    })
}

/// Follows grove's terminal's size (SIGWINCH) into the process's PTY (Resize).
fn follow_window_size(mut pc: ProcessClient, process_id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut winch) = signal(SignalKind::window_change()) else { return };
        while winch.recv().await.is_some() {
            if let Some((rows, cols)) = terminal_size() {
                let req = pb::ResizeProcessRequest { process_id: process_id.clone(), rows, cols };
                if pc.resize(req).await.is_err() {
                    return;
                }
            }
        }
    })
}

/// `ID:/path` → (ID, /path); anything else is a local path.
fn guest_path(s: &str) -> Option<(String, String)> {
    let (id, path) = s.split_once(':')?;
    (id.starts_with("sb-") && path.starts_with('/')).then(|| (id.to_string(), path.to_string()))
}

/// `grove cp`: streams a file between this machine and a sandbox; returns the bytes copied.
async fn copy(c: &mut Clients, src: &str, dst: &str, parents: bool) -> Result<u64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let st = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match (guest_path(src), guest_path(dst)) {
        (None, Some((id, path))) => {
            let (mode, mut input): (u32, Box<dyn tokio::io::AsyncRead + Unpin + Send>) =
                if src == "-" {
                    (0o644, Box::new(tokio::io::stdin()))
                } else {
                    let f = tokio::fs::File::open(src).await.map_err(|e| format!("{src}: {e}"))?;
                    let m = f.metadata().await.map_err(|e| format!("{src}: {e}"))?;
                    if !m.is_file() {
                        return Err(format!("{src} is not a regular file"));
                    }
                    (std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777, Box::new(f))
                };
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteFileRequest>(4);
            let reader = tokio::spawn(async move {
                let mut first = Some(pb::WriteFileRequest {
                    sandbox_id: id,
                    path,
                    mode,
                    append: false,
                    make_parents: parents,
                    data: Vec::new(),
                });
                loop {
                    let mut buf = vec![0u8; 1 << 20];
                    let n = input.read(&mut buf).await.map_err(|e| e.to_string())?;
                    buf.truncate(n);
                    let msg = match first.take() {
                        Some(mut f) => {
                            f.data = buf;
                            f
                        }
                        None if n == 0 => return Ok::<(), String>(()),
                        None => pb::WriteFileRequest { data: buf, ..Default::default() },
                    };
                    if tx.send(msg).await.is_err() || n == 0 {
                        return Ok(());
                    }
                }
            });
            let r = c.files.write(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
            reader.await.map_err(|e| e.to_string())??;
            Ok(r.map_err(st)?.into_inner().bytes)
        }
        (Some((id, path)), None) => {
            let mut s = c
                .files
                .read(pb::ReadFileRequest { sandbox_id: id, path, offset: 0, length: 0 })
                .await
                .map_err(st)?
                .into_inner();
            let to_stdout = dst == "-";
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if to_stdout {
                Box::new(tokio::io::stdout())
            } else {
                Box::new(tokio::fs::File::create(dst).await.map_err(|e| format!("{dst}: {e}"))?)
            };
            let mut n = 0u64;
            let r: Result<(), String> = async {
                while let Some(chunk) = s.message().await.map_err(st)? {
                    out.write_all(&chunk.data).await.map_err(|e| format!("{dst}: {e}"))?;
                    n += chunk.data.len() as u64;
                }
                out.flush().await.map_err(|e| format!("{dst}: {e}"))
            }
            .await;
            if let Err(e) = r {
                if !to_stdout {
                    // A cut copy is not left looking complete.
                    let _ = std::fs::remove_file(dst);
                }
                return Err(e);
            }
            Ok(n)
        }
        _ => Err("grove cp: exactly one of SRC and DST is ID:/path".into()),
    }
}

/// `grove fork … -- CMD`: prints each child's output as `[i] line`, then a summary.
async fn fork_run(c: &mut Clients, req: pb::ForkRunRequest, j: bool) -> Result<u8, String> {
    let st = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut s = c.sandbox.fork_run(req).await.map_err(st)?.into_inner();
    let mut ids: Vec<String> = Vec::new();
    let mut partial: HashMap<(u32, i32), Vec<u8>> = HashMap::new();
    let mut ends: HashMap<u32, String> = HashMap::new();
    let mut ok = true;
    let emit = |i: u32, stream: i32, line: &[u8]| {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\n', '\r']);
        if j {
            let name = if stream == pb::OutputStream::Stderr as i32 { "stderr" } else { "stdout" };
            println!("{}", json!({"child": i, "stream": name, "line": text}));
        } else if stream == pb::OutputStream::Stderr as i32 {
            eprintln!("[{i}] {text}");
        } else {
            println!("[{i}] {text}");
        }
    };
    while let Some(ev) = s.message().await.map_err(st)? {
        match ev.event {
            Some(pb::fork_run_event::Event::Forked(f)) => {
                ids = f.children.iter().map(|ch| ch.id.clone()).collect();
            }
            Some(pb::fork_run_event::Event::Error(e)) => {
                ok = false;
                ends.insert(ev.child, format!("error: {e}"));
            }
            Some(pb::fork_run_event::Event::Process(p)) => match p.event {
                Some(pb::process_event::Event::Output(o)) => {
                    let buf = partial.entry((ev.child, o.stream)).or_default();
                    buf.extend_from_slice(&o.data);
                    while let Some(n) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=n).collect();
                        emit(ev.child, o.stream, &line);
                    }
                }
                Some(pb::process_event::Event::Exit(x)) => {
                    for stream in [pb::OutputStream::Stdout as i32, pb::OutputStream::Stderr as i32]
                    {
                        if let Some(rest) = partial.remove(&(ev.child, stream)) {
                            if !rest.is_empty() {
                                emit(ev.child, stream, &rest);
                            }
                        }
                    }
                    ok &= matches!(x.status, Some(pb::process_exit::Status::Code(0)));
                    ends.insert(ev.child, exit_text(&x));
                }
                _ => {}
            },
            None => {}
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        let end = ends.get(&i).cloned().unwrap_or_else(|| "no exit seen".into());
        if j {
            println!("{}", json!({"child": i, "sandbox_id": id, "end": end}));
        } else {
            println!("child {i} {id} {end}");
        }
        ok &= ends.contains_key(&i);
    }
    Ok(u8::from(!ok))
}

/// `grove exec`: returns the exit status to end with.
async fn exec(c: &mut Clients, req: pb::StartProcessRequest, feed: bool) -> Result<u8, String> {
    let st = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let tty = req.pty_rows > 0;
    let events = c.process.start(req).await.map_err(st)?.into_inner();
    let terminal = tty && std::io::stdin().is_terminal();
    let _raw = if terminal { Some(RawTerminal::enter()) } else { None };
    follow(c, events, feed, terminal).await
}

/// Prints a process's events (feeding it grove's stdin with `feed`, following the terminal's
/// size with `resize`); its exit status.
async fn follow(
    c: &mut Clients,
    mut events: tonic::Streaming<pb::ProcessEvent>,
    feed: bool,
    resize: bool,
) -> Result<u8, String> {
    use tokio::io::AsyncWriteExt;
    let st = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut out = tokio::io::stdout();
    let mut err = tokio::io::stderr();
    let mut feeder: Option<tokio::task::JoinHandle<()>> = None;
    let mut resizer: Option<tokio::task::JoinHandle<()>> = None;
    while let Some(ev) = events.message().await.map_err(st)? {
        match ev.event {
            Some(pb::process_event::Event::Started(s)) => {
                if resize && resizer.is_none() {
                    resizer = Some(follow_window_size(c.process.clone(), s.process_id.clone()));
                }
                if feed && feeder.is_none() {
                    feeder = Some(feed_stdin(c.process.clone(), s.process_id));
                }
            }
            Some(pb::process_event::Event::Output(o)) => {
                let w: &mut (dyn tokio::io::AsyncWrite + Unpin) =
                    if o.stream == pb::OutputStream::Stderr as i32 { &mut err } else { &mut out };
                // A closed output (grove ... | head) ends nothing: the rest is dropped.
                if w.write_all(&o.data).await.is_ok() {
                    let _ = w.flush().await;
                }
            }
            Some(pb::process_event::Event::Exit(x)) => {
                for t in [feeder.take(), resizer.take()].into_iter().flatten() {
                    t.abort();
                }
                if !x.error.is_empty() {
                    return Err(format!("the process's end was not seen: {}", x.error));
                }
                if x.checkpoint_snapshot_id != 0 {
                    eprintln!("checkpoint {}", x.checkpoint_snapshot_id);
                }
                if !x.checkpoint_error.is_empty() {
                    eprintln!("grove: no checkpoint: {}", x.checkpoint_error);
                }
                return Ok(exit_status(&x));
            }
            _ => {}
        }
    }
    Err("the process stream ended before the process did".into())
}

async fn run(cli: Cli) -> Result<u8, String> {
    let token = match &cli.token_file {
        Some(p) => Some(grove_agentd::config::read_token(p)?),
        None => None,
    };
    let mut c: Clients = client::connect(&cli.endpoint, token.as_deref())
        .await
        .map_err(|e| grove_agentd::error::one_line(&e))?;
    let j = cli.json;
    let st = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match cli.cmd {
        Cmd::Template(t) => match t {
            TemplateCmd::Add {
                name,
                kernel,
                initrd,
                cmdline,
                vcpus,
                memory_mib,
                rootfs_image,
                rootfs_dir,
                disk_mib,
                ready,
                ready_timeout,
                guest_agent,
            } => {
                let abs = |p: PathBuf| -> Result<String, String> {
                    std::path::absolute(&p)
                        .map(|p| p.display().to_string())
                        .map_err(|e| format!("{}: {e}", p.display()))
                };
                let (ready_check, ready_text) = match ready.split_once(':') {
                    Some(("serial", text)) => (pb::ReadyCheck::SerialText, text.to_string()),
                    None if ready == "boot-timer" => (pb::ReadyCheck::BootTimer, String::new()),
                    _ => {
                        return Err(format!(
                            "--ready {ready:?}: expected boot-timer or serial:TEXT"
                        ))
                    }
                };
                let rootfs = match (rootfs_image, rootfs_dir) {
                    (Some(i), _) => {
                        Some(pb::register_template_request::Rootfs::RootfsImage(abs(i)?))
                    }
                    (None, Some(d)) => {
                        Some(pb::register_template_request::Rootfs::RootfsDir(abs(d)?))
                    }
                    (None, None) => None,
                };
                let t = c
                    .template
                    .register(pb::RegisterTemplateRequest {
                        name,
                        kernel: abs(kernel)?,
                        initrd: initrd.map(abs).transpose()?.unwrap_or_default(),
                        cmdline,
                        vcpus,
                        memory_mib,
                        rootfs,
                        disk_mib,
                        ready_check: ready_check.into(),
                        ready_text,
                        ready_timeout_seconds: ready_timeout,
                        guest_agent,
                    })
                    .await
                    .map_err(st)?
                    .into_inner();
                if j {
                    println!("{}", template_json(&t));
                } else {
                    println!("{}", t.name);
                }
            }
            TemplateCmd::Warm { name } => {
                let mut s =
                    c.template.warm(pb::WarmRequest { name }).await.map_err(st)?.into_inner();
                let tty = std::io::stderr().is_terminal() && !j;
                let t0 = Instant::now();
                let spin = ['|', '/', '-', '\\'];
                let mut stage = String::from("starting");
                let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
                let mut n = 0usize;
                loop {
                    tokio::select! {
                        m = s.message() => {
                            let m = m.map_err(|e| { if tty { eprintln!(); } st(e) })?;
                            let Some(m) = m else { break };
                            stage = m.message.clone();
                            if !tty && !j {
                                eprintln!("[{:>7.1} s] {}", m.elapsed_ms / 1000.0, m.message);
                            }
                            if let Some(t) = m.template {
                                if tty {
                                    eprintln!("\r{:>60}\r[{:>6.1} s] done", "", t0.elapsed().as_secs_f64());
                                }
                                if j {
                                    println!("{}", template_json(&t));
                                } else {
                                    println!("{}: warm (snapshot {})", t.name, t.snapshot);
                                }
                            }
                        }
                        _ = tick.tick(), if tty => {
                            n += 1;
                            eprint!("\r{} [{:>6.1} s] {:<60}", spin[n % 4], t0.elapsed().as_secs_f64(), stage);
                            let _ = std::io::stderr().flush();
                        }
                    }
                }
            }
            TemplateCmd::Ls => {
                let v = c
                    .template
                    .list(pb::ListTemplatesRequest {})
                    .await
                    .map_err(st)?
                    .into_inner()
                    .templates;
                if j {
                    println!("{}", Value::Array(v.iter().map(template_json).collect()));
                } else {
                    let rows: Vec<_> = v
                        .iter()
                        .map(|t| {
                            vec![
                                t.name.clone(),
                                format!("{}x{}M", t.vcpus, t.memory_mib),
                                if t.snapshot == 0 {
                                    "no".into()
                                } else {
                                    format!("snapshot {}", t.snapshot)
                                },
                                if t.base_layer == 0 {
                                    "-".into()
                                } else {
                                    format!("layer {} ({} MiB)", t.base_layer, t.disk_bytes >> 20)
                                },
                                t.sandboxes.to_string(),
                                t.cmdline.clone(),
                            ]
                        })
                        .collect();
                    table(&["NAME", "SHAPE", "WARM", "DISK", "SANDBOXES", "CMDLINE"], &rows);
                }
            }
            TemplateCmd::Rm { name } => {
                c.template.delete(pb::DeleteTemplateRequest { name }).await.map_err(st)?;
            }
        },
        Cmd::Create { template, snapshot, labels: l, vcpus, memory_mib, ttl } => {
            let source = match (template, snapshot) {
                (Some(t), _) => Some(pb::create_request::Source::Template(t)),
                (None, Some(s)) => Some(pb::create_request::Source::SnapshotId(s)),
                (None, None) => None,
            };
            let s = c
                .sandbox
                .create(pb::CreateRequest {
                    source,
                    labels: labels(&l),
                    vcpus,
                    memory_mib,
                    ttl_seconds: ttl,
                    network: None,
                })
                .await
                .map_err(st)?
                .into_inner();
            if j {
                println!("{}", sandbox_json(&s));
            } else {
                println!("{}", s.id);
            }
        }
        Cmd::Ls { labels: l, states } => {
            let states = states.iter().map(|s| parse_state(s)).collect::<Result<Vec<_>, _>>()?;
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let r = c
                    .sandbox
                    .list(pb::ListRequest {
                        labels: labels(&l),
                        states: states.clone(),
                        page_size: 1000,
                        page_token: token,
                    })
                    .await
                    .map_err(st)?
                    .into_inner();
                all.extend(r.sandboxes);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            print_sandboxes(j, &all);
        }
        Cmd::Get { id } => {
            let s = c.sandbox.get(pb::GetRequest { id }).await.map_err(st)?.into_inner();
            print_sandbox(j, &s);
        }
        Cmd::Pause { id } => {
            let s = c.sandbox.pause(pb::PauseRequest { id }).await.map_err(st)?.into_inner();
            print_sandbox(j, &s);
        }
        Cmd::Resume { id } => {
            let s = c.sandbox.resume(pb::ResumeRequest { id }).await.map_err(st)?.into_inner();
            print_sandbox(j, &s);
        }
        Cmd::Snapshot { id, labels: l } => {
            let s = c
                .sandbox
                .snapshot(pb::SnapshotRequest { id, labels: labels(&l) })
                .await
                .map_err(st)?
                .into_inner();
            if j {
                println!("{}", snapshot_json(&s));
            } else {
                println!("{}", s.id);
            }
        }
        Cmd::Rm { ids, subtree } => {
            let mut deleted = Vec::new();
            for id in ids {
                let r = c.sandbox.delete(pb::DeleteRequest { id, subtree }).await.map_err(st)?;
                deleted.extend(r.into_inner().deleted);
            }
            print_ids(j, subtree, &deleted);
        }
        Cmd::Tree { id } => {
            let root = c.sandbox.get(pb::GetRequest { id }).await.map_err(st)?.into_inner();
            let tree = subtree(&mut c, root).await.map_err(st)?;
            if j {
                println!("{}", tree_json(&tree));
            } else {
                if !tree.node.ancestors.is_empty() {
                    println!("ancestors: {}", tree.node.ancestors.join(" <- "));
                }
                print_tree(&tree, "", "");
            }
        }
        Cmd::Keep { id } => {
            let r = c.sandbox.keep(pb::KeepRequest { id }).await.map_err(st)?.into_inner();
            print_ids(j, true, &r.deleted);
        }
        Cmd::Ttl { id, seconds, subtree } => {
            let r = c
                .sandbox
                .set_ttl(pb::SetTtlRequest { id, ttl_seconds: seconds, subtree })
                .await
                .map_err(st)?
                .into_inner();
            print_sandboxes(j, &r.sandboxes);
        }
        Cmd::Rewind { id, snapshot } => {
            let s = c
                .sandbox
                .rewind(pb::RewindRequest { id, snapshot_id: snapshot })
                .await
                .map_err(st)?
                .into_inner();
            print_sandbox(j, &s);
        }
        Cmd::Fork { id, count, labels: l, env, child_env, deterministic, run, cmd }
            if run.is_some() || !cmd.is_empty() =>
        {
            let argv = match run {
                Some(line) => vec!["sh".into(), "-c".into(), line],
                None => cmd,
            };
            let mut children: Vec<pb::ChildRun> = Vec::new();
            for (i, k, v) in child_env {
                if i >= count as usize {
                    return Err(format!("--child-env {i}:…: there are {count} children"));
                }
                if children.len() <= i {
                    children.resize(i + 1, pb::ChildRun::default());
                }
                children[i].env.insert(k, v);
            }
            let req = pb::ForkRunRequest {
                id,
                count,
                labels: labels(&l),
                argv,
                env: labels(&env),
                children,
                deterministic,
                ..Default::default()
            };
            return fork_run(&mut c, req, j).await;
        }
        Cmd::Fork { id, count, labels: l, deterministic, .. } => {
            let r = c
                .sandbox
                .fork(pb::ForkRequest {
                    id,
                    count,
                    labels: labels(&l),
                    child_labels: Vec::new(),
                    ttl_seconds: 0,
                    deterministic,
                })
                .await
                .map_err(st)?
                .into_inner();
            if j {
                println!(
                    "{}",
                    json!({
                        "snapshot": r.snapshot.as_ref().map(snapshot_json),
                        "children": r.children.iter().map(sandbox_json).collect::<Vec<_>>(),
                    })
                );
            } else {
                for ch in &r.children {
                    println!("{}", ch.id);
                }
            }
        }
        Cmd::WatchDir { id, dir } => {
            let mut s = c
                .files
                .watch(pb::WatchDirRequest { sandbox_id: id, path: dir })
                .await
                .map_err(st)?
                .into_inner();
            // The stream's headers came: the watch is in place. Say so (for scripts) on stderr.
            eprintln!("watching");
            while let Some(ev) = s.message().await.map_err(st)? {
                let kind = pb::FileEventKind::try_from(ev.kind)
                    .map(|k| {
                        k.as_str_name()
                            .trim_start_matches("FILE_EVENT_KIND_")
                            .to_lowercase()
                            .replace('_', "-")
                    })
                    .unwrap_or_default();
                if j {
                    println!("{}", json!({"kind": kind, "path": ev.path, "is_dir": ev.is_dir}));
                } else {
                    println!("{kind} {}{}", ev.path, if ev.is_dir { "/" } else { "" });
                }
                let _ = std::io::stdout().flush();
            }
        }
        Cmd::Watch { id, current } => {
            let mut s = c
                .sandbox
                .watch(pb::WatchRequest { id: id.unwrap_or_default(), include_current: current })
                .await
                .map_err(st)?
                .into_inner();
            while let Some(ev) = s.message().await.map_err(st)? {
                let kind = pb::EventKind::try_from(ev.kind)
                    .map(|k| k.as_str_name().trim_start_matches("EVENT_KIND_").to_lowercase())
                    .unwrap_or_default();
                let sb = ev.sandbox.unwrap_or_default();
                if j {
                    println!(
                        "{}",
                        json!({"kind": kind, "unix_ms": ev.unix_ms, "sandbox": sandbox_json(&sb)})
                    );
                } else {
                    println!(
                        "{} {:<8} {} {} {}",
                        ev.unix_ms,
                        kind,
                        sb.id,
                        state_name(sb.state),
                        sb.reason
                    );
                }
                let _ = std::io::stdout().flush();
            }
        }
        Cmd::Snapshots(s) => match s {
            SnapshotsCmd::Ls => {
                let v = c
                    .sandbox
                    .list_snapshots(pb::ListSnapshotsRequest {})
                    .await
                    .map_err(st)?
                    .into_inner()
                    .snapshots;
                if j {
                    println!("{}", Value::Array(v.iter().map(snapshot_json).collect()));
                } else {
                    let rows: Vec<_> = v
                        .iter()
                        .map(|s| {
                            vec![
                                s.id.to_string(),
                                if s.parent == 0 { "-".into() } else { s.parent.to_string() },
                                if s.sandbox.is_empty() { "-".into() } else { s.sandbox.clone() },
                                format!("{}x{}M", s.vcpus, s.memory_mib),
                                s.depth.to_string(),
                                s.refs.to_string(),
                                labels_text(&s.labels),
                            ]
                        })
                        .collect();
                    table(&["ID", "PARENT", "SANDBOX", "SHAPE", "DEPTH", "REFS", "LABELS"], &rows);
                }
            }
            SnapshotsCmd::Rm { id } => {
                c.sandbox.delete_snapshot(pb::DeleteSnapshotRequest { id }).await.map_err(st)?;
            }
        },
        Cmd::Node(NodeCmd::Info) => {
            let i = c.node.info(pb::InfoRequest {}).await.map_err(st)?.into_inner();
            let cap = i.capacity.unwrap_or_default();
            if j {
                let host: Value = serde_json::from_str(&i.host_check_json).unwrap_or(Value::Null);
                println!(
                    "{}",
                    json!({
                        "agentd_version": i.agentd_version, "vmm_api_version": i.vmm_api_version,
                        "api": i.api, "hostname": i.hostname, "kernel": i.kernel, "kvm": i.kvm,
                        "data_dir": i.data_dir, "started_unix_ms": i.started_unix_ms, "host": host,
                        "capacity": {"memory_mib": cap.memory_mib, "memory_used_mib": cap.memory_used_mib,
                            "vcpus": cap.vcpus, "vcpus_used": cap.vcpus_used, "sandboxes": cap.sandboxes},
                        "pools": i.pools.iter().map(|p| json!({"vcpus": p.vcpus, "memory_mib": p.memory_mib, "ready": p.ready, "target": p.target})).collect::<Vec<_>>(),
                    })
                );
            } else {
                println!(
                    "agentd     {} (API {}, VMM API {})",
                    i.agentd_version, i.api, i.vmm_api_version
                );
                println!("host       {} (Linux {})", i.hostname, i.kernel);
                println!("kvm        {}", if i.kvm.is_empty() { "?" } else { &i.kvm });
                println!("data       {}", i.data_dir);
                println!("memory     {} of {} MiB in use", cap.memory_used_mib, cap.memory_mib);
                println!("vcpus      {} of {} in use", cap.vcpus_used, cap.vcpus);
                println!("sandboxes  {}", cap.sandboxes);
                for p in &i.pools {
                    println!(
                        "standby    {}x{}M: {} ready of {}",
                        p.vcpus, p.memory_mib, p.ready, p.target
                    );
                }
            }
        }
        Cmd::Node(NodeCmd::Metrics) => {
            let m = c.node.metrics(pb::MetricsRequest {}).await.map_err(st)?.into_inner();
            print!("{}", m.text);
        }
        Cmd::Exec { id, interactive, tty, env, cwd, user, timeout, checkpoint, argv } => {
            let (rows, cols) = if tty { terminal_size().unwrap_or((24, 80)) } else { (0, 0) };
            let req = pb::StartProcessRequest {
                sandbox_id: id,
                argv,
                env: labels(&env),
                cwd,
                user,
                timeout_seconds: timeout,
                stdin: interactive || tty,
                pty_rows: rows,
                pty_cols: cols,
                checkpoint,
            };
            return exec(&mut c, req, interactive || tty).await;
        }
        Cmd::Cp { src, dst, parents } => {
            let n = copy(&mut c, &src, &dst, parents).await?;
            if j {
                println!("{}", json!({ "bytes": n }));
            }
        }
        Cmd::Ps { id } => {
            let r = c
                .process
                .list(pb::ListProcessesRequest { sandbox_id: id.unwrap_or_default() })
                .await
                .map_err(st)?
                .into_inner();
            if j {
                let v: Vec<Value> = r
                    .processes
                    .iter()
                    .map(|p| {
                        json!({
                            "process_id": p.process_id, "sandbox_id": p.sandbox_id,
                            "argv": p.argv, "pid": p.pid, "running": p.running,
                            "exit": p.exit.as_ref().map(exit_text),
                            "started_unix_ms": p.started_unix_ms,
                        })
                    })
                    .collect();
                println!("{}", Value::Array(v));
            } else {
                let rows: Vec<Vec<String>> = r
                    .processes
                    .iter()
                    .map(|p| {
                        vec![
                            p.process_id.clone(),
                            p.sandbox_id.clone(),
                            p.pid.to_string(),
                            if p.running {
                                "running".into()
                            } else {
                                p.exit.as_ref().map(exit_text).unwrap_or_default()
                            },
                            p.argv.join(" "),
                        ]
                    })
                    .collect();
                table(&["PROCESS", "SANDBOX", "PID", "STATE", "COMMAND"], &rows);
            }
        }
        Cmd::Attach { process_id, from } => {
            let events = c
                .process
                .connect(pb::ConnectProcessRequest { process_id, from_seq: from })
                .await
                .map_err(st)?
                .into_inner();
            return follow(&mut c, events, false, false).await;
        }
        Cmd::Wait { process_id } => {
            let x = c
                .process
                .wait(pb::WaitProcessRequest { process_id })
                .await
                .map_err(st)?
                .into_inner();
            println!("{}", exit_text(&x));
            return Ok(exit_status(&x));
        }
        Cmd::Kill { process_id, signal } => {
            c.process.signal(pb::SignalProcessRequest { process_id, signal }).await.map_err(st)?;
        }
    }
    Ok(0)
}

/// The status grove ends with for a process's exit: its code, 128+N for signal N, else 1.
fn exit_status(x: &pb::ProcessExit) -> u8 {
    match x.status {
        _ if !x.error.is_empty() => 1,
        Some(pb::process_exit::Status::Code(c)) => u8::try_from(c & 0xff).unwrap_or(1),
        Some(pb::process_exit::Status::Signal(s)) => u8::try_from((128 + s) & 0xff).unwrap_or(1),
        None => 1,
    }
}

fn exit_text(x: &pb::ProcessExit) -> String {
    match x.status {
        _ if !x.error.is_empty() => format!("lost: {}", x.error),
        Some(pb::process_exit::Status::Code(c)) => format!("exit {c}"),
        Some(pb::process_exit::Status::Signal(s)) => format!("signal {s}"),
        None => "ended".into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("grove: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(run(cli));
    // `exec -i` reads stdin on a blocking thread, and a read of a terminal cannot be
    // cancelled: a runtime that waited for it would keep grove alive after the process
    // ended until the user pressed a key (the test host's tmux check found it).
    rt.shutdown_background();
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // println! panics on a closed pipe; errors go to stderr, which we leave as is.
            eprintln!("grove: {e}");
            ExitCode::from(1)
        }
    }
}

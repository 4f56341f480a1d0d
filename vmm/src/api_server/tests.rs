//! The control socket driven by real clients, the event loop turned by hand.

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberId, SubscriberOps};

use super::*;

type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

struct Rig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    em: Em,
    srv: Arc<Mutex<ApiServer>>,
    id: SubscriberId,
}

impl Rig {
    fn new(cfg: ApiConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let srv = Arc::new(Mutex::new(ApiServer::bind(path.to_str().unwrap(), cfg).unwrap()));
        let mut em = Em::new().unwrap();
        let id = em.add_subscriber(srv.clone());
        Self { _dir: dir, path, em, srv, id }
    }

    /// Turns the loop; answers every queued request with `f`.
    fn turn(&mut self, f: &dyn Fn(&Request) -> Answer) {
        self.em.run_with_timeout(50).unwrap();
        let reqs = self.srv.lock().unwrap().take_requests();
        for (conn, p) in reqs {
            let a = p.and_then(|req| f(&req));
            let mut ops = self.em.event_ops(self.id).unwrap();
            self.srv.lock().unwrap().reply(conn, &a, &mut ops);
        }
    }

    fn connect(&self) -> (UnixStream, BufReader<UnixStream>) {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        (s, r)
    }

    /// Turns the loop until `r` yields a line (at most ~200 turns).
    fn line(&mut self, r: &mut BufReader<UnixStream>, f: &dyn Fn(&Request) -> Answer) -> String {
        let mut line = String::new();
        for _ in 0..200 {
            self.turn(f);
            match r.read_line(&mut line) {
                Ok(_) if line.ends_with('\n') => return line,
                Ok(0) => return line,
                _ => {}
            }
        }
        panic!("no line; got {line:?}");
    }
}

fn pause_only(req: &Request) -> Answer {
    match req {
        Request::Pause {} => Ok(Reply::State(grove_vmm_api::RunState::Paused)),
        _ => Err(Refusal::new(ErrorCode::Internal, "only pause")),
    }
}

fn code(line: &str) -> Option<ErrorCode> {
    grove_vmm_api::decode_reply(line).unwrap().err().map(|e| e.code)
}

#[test]
fn requests_are_answered_in_order_and_bad_lines_refused() {
    let mut rig = Rig::new(ApiConfig::default());
    let (mut w, mut r) = rig.connect();
    // Two requests and a malformed line in one write: answers come back in order.
    w.write_all(b"{\"cmd\":\"pause\"}\n{\"cmd\":\"explode\"}\n\n{\"cmd\":\"resume\"}\n").unwrap();
    let a = rig.line(&mut r, &pause_only);
    assert!(a.contains("\"paused\""), "{a}");
    let b = rig.line(&mut r, &pause_only);
    assert_eq!(code(&b), Some(ErrorCode::BadRequest), "{b}");
    let c = rig.line(&mut r, &pause_only);
    assert_eq!(code(&c), Some(ErrorCode::Internal), "{c}");
    // Still usable.
    w.write_all(b"{\"cmd\":\"pause\"}\n").unwrap();
    assert!(rig.line(&mut r, &pause_only).contains("paused"));
    assert_eq!(rig.srv.lock().unwrap().connections(), 1);
}

#[test]
fn an_over_long_line_is_refused_and_closes_the_connection() {
    let mut rig = Rig::new(ApiConfig::default());
    let (mut w, mut r) = rig.connect();
    let long = vec![b'x'; MAX_LINE + 10];
    // Written from a thread: the socket buffer may not take it all at once.
    let mut w2 = w.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let _ = w2.write_all(&long);
    });
    let a = rig.line(&mut r, &pause_only);
    t.join().unwrap();
    assert_eq!(code(&a), Some(ErrorCode::BadRequest), "{a}");
    assert!(a.contains("longer than"), "{a}");
    let eof = rig.line(&mut r, &pause_only);
    assert_eq!(eof, "", "closed after the refusal");
    assert_eq!(rig.srv.lock().unwrap().connections(), 0);
    let _ = w.write_all(b"\n");
}

#[test]
fn connections_are_capped() {
    let mut rig = Rig::new(ApiConfig { max_connections: 2, ..ApiConfig::default() });
    let (_a, _ra) = rig.connect();
    let (_b, _rb) = rig.connect();
    rig.turn(&pause_only);
    let (_c, mut rc) = rig.connect();
    let refused = rig.line(&mut rc, &pause_only);
    assert_eq!(code(&refused), Some(ErrorCode::ResourceExhausted), "{refused}");
    assert_eq!(rig.line(&mut rc, &pause_only), "", "then closed");
    assert_eq!(rig.srv.lock().unwrap().connections(), 2);
}

#[test]
fn idle_connections_are_closed() {
    let mut rig =
        Rig::new(ApiConfig { idle_timeout: Duration::from_millis(30), ..ApiConfig::default() });
    let (_a, mut ra) = rig.connect();
    rig.turn(&pause_only);
    assert_eq!(rig.srv.lock().unwrap().connections(), 1);
    std::thread::sleep(Duration::from_millis(40));
    let mut ops = rig.em.event_ops(rig.id).unwrap();
    let next = rig.srv.lock().unwrap().expire(Instant::now(), &mut ops);
    assert_eq!(next, None, "nothing left to expire");
    assert_eq!(rig.srv.lock().unwrap().connections(), 0);
    assert_eq!(rig.line(&mut ra, &pause_only), "", "the client sees the close");
}

#[test]
fn a_client_that_writes_and_hangs_up_still_gets_its_request_run() {
    let mut rig = Rig::new(ApiConfig::default());
    let ran = Arc::new(Mutex::new(0));
    let (mut w, _r) = rig.connect();
    w.write_all(b"{\"cmd\":\"pause\"}\n").unwrap();
    w.shutdown(std::net::Shutdown::Both).unwrap();
    let ran2 = ran.clone();
    let f = move |r: &Request| {
        *ran2.lock().unwrap() += 1;
        pause_only(r)
    };
    for _ in 0..20 {
        rig.turn(&f);
    }
    assert_eq!(*ran.lock().unwrap(), 1);
    assert_eq!(rig.srv.lock().unwrap().connections(), 0);
}

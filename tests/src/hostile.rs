//! A scriptable *hostile* HTTP/1.1 server for end-to-end tests: it listens on a free
//! port of 127.0.0.1 and either answers everything itself or sits in front of a real
//! plain-HTTP registry (a [`TestRegistry`](crate::registry::TestRegistry)) and
//! forwards every request there, except those a [`Rule`] intercepts. Rules make it
//! misbehave the ways a registry, a CDN or a token server can: endless bodies, more
//! bytes than announced, stalls before the headers or in the middle of a body, a
//! drip, redirects (to another host, or in a loop), dropped connections.
//!
//! Every request it sees is recorded ([`HostileServer::requests`]), so a second,
//! rule-less instance in front of the same registry serves as "another host" for
//! redirects and tells a test which headers (`Authorization`!) reached it.
//!
//! ```no_run
//! use std::time::Duration;
//! use sarde_e2e::hostile::{Action, HostileServer, Matcher, Mutation, Rule};
//! use sarde_e2e::registry::{RegistryOptions, TestRegistry};
//!
//! let registry = TestRegistry::start(RegistryOptions::default());
//! let hostile = HostileServer::start(Some(registry.address()));
//! // The first blob download stops after 1000 bytes; the next one is served in full.
//! hostile.add_rule(Rule::first(
//!     1,
//!     Matcher::path_contains("GET", "/blobs/sha256:"),
//!     Action::ForwardThen(Mutation::StallAfter {
//!         bytes: 1000,
//!         for_: Duration::from_secs(30),
//!     }),
//! ));
//! let reference = format!("{}/test/image:latest", hostile.address());
//! ```
//!
//! One thread per connection, std only. Dropping the server stops it: the accept loop
//! ends, every stall and drip wakes up and every open socket (client and upstream
//! side) is shut down, so no handler thread outlives it for long.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The most bytes of a request or response head (start line and headers) read.
const MAX_HEAD_BYTES: u64 = 64 * 1024;

/// How long a forwarded request waits for the upstream registry before giving up.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// The start of endless bodies: an unfinished JSON object, so a parser never
/// sees the end of its string. Filler bytes ([`FILLER`]) follow forever.
const ENDLESS_PREFIX: &[u8] = br#"{"a":""#;

/// The byte that endless bodies and [`Mutation::AppendBytes`] consist of.
const FILLER: u8 = b'a';

/// How many bytes endless bodies write at a time.
const ENDLESS_PIECE: usize = 64 * 1024;

/// A hostile HTTP/1.1 server on 127.0.0.1; see the module documentation. Stops
/// when dropped.
pub struct HostileServer {
    address: SocketAddr,
    shared: Arc<Shared>,
    accept_loop: Option<JoinHandle<()>>,
}

/// One request the server received (all of them are recorded, intercepted or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// `GET`, `PUT`, …
    pub method: String,
    /// The request target as sent: path and query, e.g. `/v2/t/tags/list?n=10`.
    pub target: String,
    /// The headers in the order received, names as the client spelled them.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }

    /// The path of the target, without the query.
    pub fn path(&self) -> &str {
        path_of(&self.target)
    }
}

/// A predicate on requests: a method (`"*"` for any) and a test of the path
/// (without the query string).
pub struct Matcher {
    method: String,
    path: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl Matcher {
    /// Requests with `method` (`"*"`: any method) whose path (query excluded)
    /// satisfies `path`.
    pub fn new(method: &str, path: impl Fn(&str) -> bool + Send + Sync + 'static) -> Matcher {
        Matcher {
            method: method.to_string(),
            path: Box::new(path),
        }
    }

    /// Requests with `method` (`"*"`: any) whose path contains `needle`.
    pub fn path_contains(method: &str, needle: &str) -> Matcher {
        let needle = needle.to_string();
        Matcher::new(method, move |path| path.contains(&needle))
    }

    /// Requests with `method` (`"*"`: any) whose path ends with `suffix`.
    pub fn path_ends_with(method: &str, suffix: &str) -> Matcher {
        let suffix = suffix.to_string();
        Matcher::new(method, move |path| path.ends_with(&suffix))
    }

    /// Downloads (`GET`) of the blob `digest` (`sha256:HEX`), in any repository.
    pub fn blob_get(digest: &str) -> Matcher {
        Matcher::path_ends_with("GET", &format!("/blobs/{digest}"))
    }

    /// Whether a request of `method` for `path` (no query) matches.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        (self.method == "*" || self.method.eq_ignore_ascii_case(method)) && (self.path)(path)
    }
}

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matcher")
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

/// What to do with the requests `matcher` matches. Rules are tried in the order
/// they were added; the first one that matches and has uses left applies. A
/// request no rule applies to is forwarded unchanged (or answered 502 when the
/// server has no upstream).
#[derive(Debug)]
pub struct Rule {
    pub matcher: Matcher,
    pub action: Action,
    /// `None`: every matching request; `Some(n)`: the first `n` matching requests
    /// only, later ones fall through to the next rules (or are forwarded).
    pub times: Option<usize>,
}

impl Rule {
    /// A rule for every request `matcher` matches.
    pub fn always(matcher: Matcher, action: Action) -> Rule {
        Rule {
            matcher,
            action,
            times: None,
        }
    }

    /// A rule for the first `times` requests `matcher` matches.
    pub fn first(times: usize, matcher: Matcher, action: Action) -> Rule {
        Rule {
            matcher,
            action,
            times: Some(times),
        }
    }
}

/// How the server treats an intercepted request. The request body, if any, is
/// always read completely first (after a `100 Continue` when the client asked).
#[derive(Debug, Clone)]
pub enum Action {
    /// Answer without asking upstream: `status`, `headers`, `body`. A
    /// `Content-Length` header in `headers` is sent as given (lies included) and
    /// the connection is closed after the body; otherwise the server adds the
    /// right framing. HEAD requests get the headers only.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Body,
    },
    /// Forward upstream, then spoil the answer.
    ForwardThen(Mutation),
    /// Answer `status` with `Location: location` and an empty body. `{path}` in
    /// `location` is replaced by the request's target (path and query), so
    /// `http://127.0.0.1:PORT{path}` sends every request to the same path on
    /// another server, and `{path}` alone makes a redirect loop.
    Redirect { status: u16, location: String },
    /// Say nothing for the duration (or until the server stops), then close the
    /// connection. Upstream never hears of the request.
    Stall(Duration),
    /// Close the connection without answering.
    Close,
}

/// A body the server makes up.
#[derive(Debug, Clone)]
pub enum Body {
    /// These bytes, with `Content-Length`.
    Bytes(Vec<u8>),
    /// `{"a":"aaaa…` forever, `Transfer-Encoding: chunked`: until the client hangs
    /// up or the server stops.
    Endless,
    /// `{"a":"aaaa…` forever with neither `Content-Length` nor chunking
    /// (`Connection: close`, the body ends with the connection, i.e. never).
    EndlessUntilClose,
}

impl Body {
    /// A body of `text`.
    pub fn text(text: &str) -> Body {
        Body::Bytes(text.as_bytes().to_vec())
    }
}

/// How a forwarded answer is spoiled ([`Action::ForwardThen`]).
#[derive(Debug, Clone)]
pub enum Mutation {
    /// The real answer with `n` filler bytes after its body. A `Content-Length`
    /// is raised by `n` (on HEAD answers too); chunked and close-delimited bodies
    /// just go on for `n` more bytes.
    AppendBytes(u64),
    /// The real headers and the first `bytes` bytes of the body, then silence for
    /// `for_` (or until the server stops), then the connection is closed. A body
    /// of at most `bytes` bytes is sent in full without a stall.
    StallAfter { bytes: u64, for_: Duration },
    /// The real headers at once, then the body at `bytes_per_second` (one byte at
    /// a time below 20 bytes/s, in 20 pieces a second above).
    Drip { bytes_per_second: u32 },
    /// The request is forwarded and its answer read (so upstream did the work) but
    /// the client gets no byte at all: silence for the duration (or until the
    /// server stops), then the connection is closed.
    StallBeforeHeaders(Duration),
}

impl HostileServer {
    /// Starts a server on a free port of 127.0.0.1. With `upstream`
    /// (`"127.0.0.1:PORT"` of a plain-HTTP server) requests no rule intercepts are
    /// forwarded there; without, they are answered 502.
    pub fn start(upstream: Option<String>) -> HostileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port on 127.0.0.1");
        let address = listener.local_addr().expect("the listener's address");
        let shared = Arc::new(Shared::new(address.to_string(), upstream));
        let accepting = Arc::clone(&shared);
        let accept_loop = std::thread::Builder::new()
            .name(format!("hostile-accept-{}", address.port()))
            .spawn(move || accept_connections(listener, accepting))
            .expect("the accept thread starts");
        HostileServer {
            address,
            shared,
            accept_loop: Some(accept_loop),
        }
    }

    /// `127.0.0.1:PORT`, as in image references.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Adds a rule after the existing ones.
    pub fn add_rule(&self, rule: Rule) {
        lock(&self.shared.rules).push(rule);
    }

    /// Removes every rule: from now on everything is forwarded.
    pub fn clear_rules(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Closes every open connection, client and upstream side, at once, as a
    /// server that dies does, and ends every stall and drip; unlike dropping the
    /// server, it goes on accepting (and forwarding) new connections. A test that
    /// stalls a download with a rule can so end it at the moment it chooses.
    pub fn cut_connections(&self) {
        self.shared.cuts.fetch_add(1, Ordering::SeqCst);
        self.shared.wake_all();
        for socket in lock(&self.shared.open_sockets).values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// How many stalls (and waits of drips) have begun so far: a stalled answer
    /// has sent everything it will before its stall begins, so a test can wait for
    /// this instead of guessing how long the answer takes.
    pub fn pauses(&self) -> u64 {
        self.shared.pauses.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).clone()
    }

    /// Whether any request received so far had a header `name` (case-insensitive).
    pub fn saw_header(&self, name: &str) -> bool {
        lock(&self.shared.seen)
            .iter()
            .any(|request| request.header(name).is_some())
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.shared.stop();
        // accept() does not notice the flag by itself: wake it with a connection.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_secs(1));
        if let Some(accept_loop) = self.accept_loop.take() {
            let _ = accept_loop.join();
        }
    }
}

/// State shared by the server handle and its threads.
struct Shared {
    own_address: String,
    upstream: Option<String>,
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<SeenRequest>>,
    stopping: AtomicBool,
    /// How many times [`HostileServer::cut_connections`] ran: a pause that sees it
    /// change ends, as it does when the server stops.
    cuts: AtomicU64,
    /// How many pauses (stalls, and the waits of drips) have begun.
    pauses: AtomicU64,
    /// Stalls and drips wait on `wake` so that stopping ends them at once.
    wake_lock: Mutex<()>,
    wake: Condvar,
    /// A clone of every open socket, to shut them down when the server stops:
    /// that unblocks handler threads stuck reading or writing.
    open_sockets: Mutex<HashMap<u64, TcpStream>>,
    next_socket: AtomicU64,
}

impl Shared {
    fn new(own_address: String, upstream: Option<String>) -> Shared {
        Shared {
            own_address,
            upstream,
            rules: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            cuts: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
            open_sockets: Mutex::new(HashMap::new()),
            next_socket: AtomicU64::new(0),
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake_all();
        for socket in lock(&self.open_sockets).values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    fn wake_all(&self) {
        let _guard = lock(&self.wake_lock);
        self.wake.notify_all();
    }

    /// Waits `duration`, or until the server stops or its connections are cut;
    /// true when the whole time passed.
    fn pause(&self, duration: Duration) -> bool {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        let cuts = self.cuts.load(Ordering::SeqCst);
        let interrupted = || self.stopping() || self.cuts.load(Ordering::SeqCst) != cuts;
        let guard = lock(&self.wake_lock);
        let _ = self
            .wake
            .wait_timeout_while(guard, duration, |_| !interrupted())
            .unwrap_or_else(|e| e.into_inner());
        !interrupted()
    }

    /// Registers `socket` to be shut down when the server stops, until the
    /// returned guard is dropped.
    fn track(self: &Arc<Self>, socket: &TcpStream) -> TrackedSocket {
        let id = self.next_socket.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = socket.try_clone() {
            lock(&self.open_sockets).insert(id, clone);
        }
        // stop() may have run just before the insertion.
        if self.stopping() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        TrackedSocket {
            shared: Arc::clone(self),
            id,
        }
    }

    fn record(&self, request: &RequestHead) {
        lock(&self.seen).push(SeenRequest {
            method: request.method.clone(),
            target: request.target.clone(),
            headers: request.headers.clone(),
        });
    }

    /// The action of the first rule that matches and has uses left (using one up).
    fn action_for(&self, request: &RequestHead) -> Option<Action> {
        let path = path_of(&request.target);
        let mut rules = lock(&self.rules);
        for rule in rules.iter_mut() {
            if !rule.matcher.matches(&request.method, path) {
                continue;
            }
            match &mut rule.times {
                Some(0) => continue,
                Some(left) => *left -= 1,
                None => {}
            }
            return Some(rule.action.clone());
        }
        None
    }
}

struct TrackedSocket {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for TrackedSocket {
    fn drop(&mut self) {
        lock(&self.shared.open_sockets).remove(&self.id);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_connections(listener: TcpListener, shared: Arc<Shared>) {
    for connection in listener.incoming() {
        if shared.stopping() {
            return;
        }
        let Ok(client) = connection else {
            // Out of file descriptors, say: do not spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let serving = Arc::clone(&shared);
        let _ = std::thread::Builder::new()
            .name("hostile-connection".into())
            .spawn(move || serve_connection(serving, client));
    }
}

/// Whether the connection may carry another request after an answer.
#[derive(Debug, PartialEq, Eq)]
enum After {
    KeepAlive,
    Close,
}

/// Serves the requests of one client connection until it closes, asks to close,
/// or an answer has to end the connection.
fn serve_connection(shared: Arc<Shared>, client: TcpStream) {
    let _tracked = shared.track(&client);
    // Drips and stalls must leave at once, not when Nagle sees fit.
    let _ = client.set_nodelay(true);
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    let mut writer = client;
    while !shared.stopping() {
        let request = match read_request_head(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) | Err(_) => break,
        };
        shared.record(&request);
        if request.expects_continue() && writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            break;
        }
        let after = match shared.action_for(&request) {
            None => forward(&shared, &request, &mut reader, &mut writer, None),
            Some(action) => act(&shared, &request, action, &mut reader, &mut writer),
        };
        match after {
            Ok(After::KeepAlive) if request.keep_alive() => continue,
            _ => break,
        }
    }
    let _ = writer.flush();
    let _ = writer.shutdown(Shutdown::Both);
}

fn act(
    shared: &Arc<Shared>,
    request: &RequestHead,
    action: Action,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> io::Result<After> {
    if let Action::ForwardThen(mutation) = action {
        return forward(shared, request, reader, writer, Some(mutation));
    }
    discard_body(reader, &request.body_framing()?)?;
    match action {
        Action::ForwardThen(_) => unreachable!("handled above"),
        Action::Respond {
            status,
            headers,
            body,
        } => respond(shared, request, writer, status, headers, body),
        Action::Redirect { status, location } => {
            let location = location.replace("{path}", &request.target);
            respond(
                shared,
                request,
                writer,
                status,
                vec![("Location".into(), location)],
                Body::Bytes(Vec::new()),
            )
        }
        Action::Stall(duration) => {
            shared.pause(duration);
            Ok(After::Close)
        }
        Action::Close => Ok(After::Close),
    }
}

/// Sends an answer the server makes up.
fn respond(
    shared: &Shared,
    request: &RequestHead,
    writer: &mut TcpStream,
    status: u16,
    mut headers: Vec<(String, String)>,
    body: Body,
) -> io::Result<After> {
    let given_length = header_value(&headers, "content-length").is_some();
    let mut after = if given_length || !request.keep_alive() {
        After::Close
    } else {
        After::KeepAlive
    };
    let chunked = match &body {
        Body::Bytes(bytes) => {
            if !given_length {
                headers.push(("Content-Length".into(), bytes.len().to_string()));
            }
            false
        }
        Body::Endless => {
            headers.push(("Transfer-Encoding".into(), "chunked".into()));
            true
        }
        Body::EndlessUntilClose => {
            after = After::Close;
            false
        }
    };
    if after == After::Close {
        headers.push(("Connection".into(), "close".into()));
    }
    writer.write_all(&response_head(status, reason_phrase(status), &headers))?;
    if request.method == "HEAD" {
        writer.flush()?;
        return Ok(after);
    }
    let mut out = BodyOut { writer, chunked };
    match body {
        Body::Bytes(bytes) => {
            out.send(&bytes)?;
            out.finish()?;
            Ok(after)
        }
        Body::Endless | Body::EndlessUntilClose => {
            send_endless(shared, &mut out)?;
            Ok(After::Close)
        }
    }
}

/// `{"a":"aaaa…` until the client hangs up (an error) or the server stops.
fn send_endless(shared: &Shared, out: &mut BodyOut<'_>) -> io::Result<()> {
    let mut first = ENDLESS_PREFIX.to_vec();
    first.resize(ENDLESS_PIECE, FILLER);
    out.send(&first)?;
    let filler = vec![FILLER; ENDLESS_PIECE];
    while !shared.stopping() {
        out.send(&filler)?;
    }
    Ok(())
}

/// Forwards `request` (its body streamed from `reader`) to the upstream server and
/// streams the answer back to `writer`, spoiled by `mutation` if any.
fn forward(
    shared: &Arc<Shared>,
    request: &RequestHead,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    mutation: Option<Mutation>,
) -> io::Result<After> {
    let request_framing = request.body_framing()?;
    let upstream_address = match (&shared.upstream, &mutation) {
        (Some(upstream), _) => upstream.clone(),
        // Nothing to forward to, but a stall needs no answer anyway.
        (None, Some(Mutation::StallBeforeHeaders(duration))) => {
            discard_body(reader, &request_framing)?;
            shared.pause(*duration);
            return Ok(After::Close);
        }
        (None, _) => {
            discard_body(reader, &request_framing)?;
            return bad_gateway(shared, request, writer, "no upstream to forward to");
        }
    };
    let upstream = match TcpStream::connect(&upstream_address) {
        Ok(upstream) => upstream,
        Err(e) => {
            discard_body(reader, &request_framing)?;
            return bad_gateway(shared, request, writer, &format!("upstream: {e}"));
        }
    };
    let _tracked = shared.track(&upstream);
    upstream.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    upstream.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;

    // The request: same method, target and headers, but for the upstream host,
    // one request per upstream connection, and a body framing of our own.
    let mut head = format!("{} {} HTTP/1.1\r\n", request.method, request.target);
    for (name, value) in &request.headers {
        if is_hop_by_hop(name) || name.eq_ignore_ascii_case("host") {
            continue;
        }
        head += &format!("{name}: {value}\r\n");
    }
    head += &format!("Host: {upstream_address}\r\nConnection: close\r\n");
    match request_framing {
        Framing::Empty => {}
        Framing::Length(length) => head += &format!("Content-Length: {length}\r\n"),
        Framing::Chunked => head += "Transfer-Encoding: chunked\r\n",
        Framing::UntilClose => unreachable!("requests are never close-delimited"),
    }
    head += "\r\n";
    let mut upstream_writer = io::BufWriter::with_capacity(64 * 1024, &upstream);
    upstream_writer.write_all(head.as_bytes())?;
    {
        let mut body = BodyOut {
            writer: &mut upstream_writer,
            chunked: request_framing == Framing::Chunked,
        };
        copy_body(reader, &request_framing, &mut |data| body.send(data))?;
        if request_framing == Framing::Chunked {
            body.finish()?;
        }
    }
    upstream_writer.flush()?;
    drop(upstream_writer);

    let mut upstream_reader = BufReader::with_capacity(64 * 1024, &upstream);
    let response = loop {
        let response = read_response_head(&mut upstream_reader)?;
        // Interim answers (1xx) are not passed on: we answered Expect ourselves.
        if !(100..200).contains(&response.status) {
            break response;
        }
    };
    let response_framing = response.body_framing(&request.method)?;

    if let Some(Mutation::StallBeforeHeaders(duration)) = mutation {
        let _ = copy_body(&mut upstream_reader, &response_framing, &mut |_| Ok(()));
        shared.pause(duration);
        return Ok(After::Close);
    }

    let appended = match mutation {
        Some(Mutation::AppendBytes(n)) => n,
        _ => 0,
    };
    let mut after = if request.keep_alive() {
        After::KeepAlive
    } else {
        After::Close
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in &response.headers {
        if name.eq_ignore_ascii_case("content-length") {
            // Kept for answers without a body (HEAD): the size of the resource.
            if response_framing == Framing::Empty {
                let length = value.trim().parse::<u64>().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad upstream Content-Length")
                })?;
                headers.push((name.clone(), (length + appended).to_string()));
            }
        } else if name.eq_ignore_ascii_case("location") {
            headers.push((name.clone(), shared.point_at_self(value)));
        } else if !is_hop_by_hop(name) {
            headers.push((name.clone(), value.clone()));
        }
    }
    match response_framing {
        Framing::Empty => {}
        Framing::Length(length) => {
            headers.push(("Content-Length".into(), (length + appended).to_string()))
        }
        Framing::Chunked => headers.push(("Transfer-Encoding".into(), "chunked".into())),
        Framing::UntilClose => after = After::Close,
    }
    if after == After::Close {
        headers.push(("Connection".into(), "close".into()));
    }
    writer.write_all(&response_head(response.status, &response.reason, &headers))?;
    writer.flush()?;
    if response_framing == Framing::Empty {
        return Ok(after);
    }

    let mut out = BodyOut {
        writer,
        chunked: response_framing == Framing::Chunked,
    };
    match mutation {
        None | Some(Mutation::AppendBytes(_)) => {
            copy_body(&mut upstream_reader, &response_framing, &mut |data| {
                out.send(data)
            })?;
            if appended > 0 {
                send_filler(&mut out, appended)?;
            }
        }
        Some(Mutation::StallAfter { bytes, for_ }) => {
            let mut sent = 0u64;
            let mut stalled = false;
            let copied = copy_body(&mut upstream_reader, &response_framing, &mut |data| {
                let room = bytes - sent;
                if data.len() as u64 <= room {
                    sent += data.len() as u64;
                    return out.send(data);
                }
                out.send(&data[..room as usize])?;
                out.writer.flush()?;
                stalled = true;
                shared.pause(for_);
                Err(io::Error::other("stalled in the middle of the body"))
            });
            if stalled {
                return Ok(After::Close);
            }
            copied?;
        }
        Some(Mutation::Drip { bytes_per_second }) => {
            let rate = u64::from(bytes_per_second.max(1));
            let piece = (rate / 20).max(1);
            let interval = Duration::from_secs_f64(piece as f64 / rate as f64);
            copy_body(&mut upstream_reader, &response_framing, &mut |data| {
                for part in data.chunks(piece as usize) {
                    out.send(part)?;
                    out.writer.flush()?;
                    if !shared.pause(interval) {
                        return Err(io::Error::other("the server stops"));
                    }
                }
                Ok(())
            })?;
        }
        Some(Mutation::StallBeforeHeaders(_)) => unreachable!("handled above"),
    }
    out.finish()?;
    Ok(after)
}

impl Shared {
    /// `location` with an absolute URL of the upstream server turned into one of
    /// this server, so that upload sessions keep coming through it.
    fn point_at_self(&self, location: &str) -> String {
        if let Some(upstream) = &self.upstream {
            let upstream_url = format!("http://{upstream}");
            if let Some(rest) = location.strip_prefix(&upstream_url) {
                if rest.is_empty() || rest.starts_with(['/', '?']) {
                    return format!("http://{}{rest}", self.own_address);
                }
            }
        }
        location.to_string()
    }
}

fn bad_gateway(
    shared: &Shared,
    request: &RequestHead,
    writer: &mut TcpStream,
    why: &str,
) -> io::Result<After> {
    respond(
        shared,
        request,
        writer,
        502,
        vec![("Content-Type".into(), "text/plain".into())],
        Body::text(&format!("hostile server: {why}\n")),
    )
}

fn send_filler(out: &mut BodyOut<'_>, mut count: u64) -> io::Result<()> {
    let filler = vec![FILLER; ENDLESS_PIECE];
    while count > 0 {
        let now = count.min(filler.len() as u64) as usize;
        out.send(&filler[..now])?;
        count -= now as u64;
    }
    Ok(())
}

/// Writes body bytes, as chunks or plain.
struct BodyOut<'a> {
    writer: &'a mut dyn Write,
    chunked: bool,
}

impl BodyOut<'_> {
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            // An empty chunk would end a chunked body.
            return Ok(());
        }
        if self.chunked {
            let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
            chunk.extend_from_slice(data);
            chunk.extend_from_slice(b"\r\n");
            self.writer.write_all(&chunk)
        } else {
            self.writer.write_all(data)
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        if self.chunked {
            self.writer.write_all(b"0\r\n\r\n")?;
        }
        self.writer.flush()
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Reads a body framed as `framing` from `reader` and hands its bytes, de-chunked,
/// to `sink` piece by piece.
fn copy_body(
    reader: &mut impl BufRead,
    framing: &Framing,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    match *framing {
        Framing::Empty => Ok(()),
        Framing::Length(length) => copy_exactly(reader, length, sink),
        Framing::UntilClose => loop {
            let buffer = reader.fill_buf()?;
            if buffer.is_empty() {
                return Ok(());
            }
            let length = buffer.len();
            sink(buffer)?;
            reader.consume(length);
        },
        Framing::Chunked => loop {
            let size_line = read_line(reader)?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no chunk size"))?;
            let size = size_line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {size:?}"))
            })?;
            if size == 0 {
                // Trailers, up to the empty line.
                while read_line(reader)?.is_some_and(|line| !line.is_empty()) {}
                return Ok(());
            }
            copy_exactly(reader, size, sink)?;
            if read_line(reader)?.as_deref() != Some("") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no CRLF after a chunk",
                ));
            }
        },
    }
}

fn copy_exactly(
    reader: &mut impl BufRead,
    mut remaining: u64,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    while remaining > 0 {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the body ended early",
            ));
        }
        let now = buffer.len().min(remaining.try_into().unwrap_or(usize::MAX));
        sink(&buffer[..now])?;
        reader.consume(now);
        remaining -= now as u64;
    }
    Ok(())
}

fn discard_body(reader: &mut impl BufRead, framing: &Framing) -> io::Result<()> {
    copy_body(reader, framing, &mut |_| Ok(()))
}

/// One line without its CR LF (or LF); `None` at the end of the stream.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_HEAD_BYTES)
        .read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a line without end",
        ));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a line that is not UTF-8"))
}

/// Header lines up to the empty line that ends a head.
fn read_headers(reader: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the head ended early"))?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() > 200 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many headers",
            ));
        }
        let (name, value) = line.split_once(':').ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("header {line:?}"))
        })?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
}

struct RequestHead {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl RequestHead {
    fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name).is_some_and(|value| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case(token))
        })
    }

    fn expects_continue(&self) -> bool {
        self.has_token("expect", "100-continue")
    }

    fn keep_alive(&self) -> bool {
        if self.version == "HTTP/1.0" {
            self.has_token("connection", "keep-alive")
        } else {
            !self.has_token("connection", "close")
        }
    }

    fn body_framing(&self) -> io::Result<Framing> {
        if self.header("transfer-encoding").is_some() {
            return if self.has_token("transfer-encoding", "chunked") {
                Ok(Framing::Chunked)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a transfer coding other than chunked",
                ))
            };
        }
        Ok(match content_length(&self.headers)? {
            Some(0) | None => Framing::Empty,
            Some(length) => Framing::Length(length),
        })
    }
}

/// The head of the next request; `None` when the client closed the connection
/// between requests.
fn read_request_head(reader: &mut impl BufRead) -> io::Result<Option<RequestHead>> {
    let request_line = loop {
        match read_line(reader)? {
            None => return Ok(None),
            // Stray empty lines before a request are allowed (RFC 9112 2.2).
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request line {request_line:?}"),
        ));
    };
    Ok(Some(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers: read_headers(reader)?,
    }))
}

struct ResponseHead {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
}

impl ResponseHead {
    fn body_framing(&self, request_method: &str) -> io::Result<Framing> {
        if request_method == "HEAD" || matches!(self.status, 100..=199 | 204 | 304) {
            return Ok(Framing::Empty);
        }
        let chunked = header_value(&self.headers, "transfer-encoding").is_some_and(|value| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case("chunked"))
        });
        if chunked {
            return Ok(Framing::Chunked);
        }
        Ok(match content_length(&self.headers)? {
            Some(length) => Framing::Length(length),
            None => Framing::UntilClose,
        })
    }
}

fn read_response_head(reader: &mut impl BufRead) -> io::Result<ResponseHead> {
    let status_line = read_line(reader)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "upstream closed without answer",
        )
    })?;
    let mut parts = status_line.splitn(3, ' ');
    let _version = parts.next();
    let status = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("status line {status_line:?}"),
            )
        })?;
    Ok(ResponseHead {
        status,
        reason: parts.next().unwrap_or("").to_string(),
        headers: read_headers(reader)?,
    })
}

fn content_length(headers: &[(String, String)]) -> io::Result<Option<u64>> {
    header_value(headers, "content-length")
        .map(|value| {
            value.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("Content-Length {value:?}"),
                )
            })
        })
        .transpose()
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

/// Headers about one connection (and the body framing, which the server sets
/// itself), not passed on when forwarding.
fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
        "content-length",
        "expect",
    ]
    .iter()
    .any(|hop| name.eq_ignore_ascii_case(hop))
}

fn path_of(target: &str) -> &str {
    target.split('?').next().unwrap_or(target)
}

fn response_head(status: u16, reason: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    head.into_bytes()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Hostile",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(framing: Framing, wire: &[u8]) -> io::Result<Vec<u8>> {
        let mut reader = io::Cursor::new(wire.to_vec());
        let mut body = Vec::new();
        copy_body(&mut reader, &framing, &mut |data| {
            body.extend_from_slice(data);
            Ok(())
        })?;
        Ok(body)
    }

    #[test]
    fn decodes_bodies() {
        let chunked = b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        assert_eq!(decode(Framing::Chunked, chunked).unwrap(), b"hello world");
        assert_eq!(decode(Framing::Length(3), b"abcdef").unwrap(), b"abc");
        assert!(decode(Framing::Length(10), b"abc").is_err());
        assert_eq!(
            decode(Framing::UntilClose, b"all of it").unwrap(),
            b"all of it"
        );
        assert!(decode(Framing::Chunked, b"zz\r\n").is_err());
    }

    #[test]
    fn parses_request_heads() {
        let wire = b"\r\nPUT /v2/t/blobs/uploads/x?digest=sha256:1 HTTP/1.1\r\nHost: h\r\n\
                     transfer-encoding: chunked\r\nExpect: 100-continue\r\nConnection: Close\r\n\r\n";
        let mut reader = io::Cursor::new(wire.to_vec());
        let head = read_request_head(&mut reader).unwrap().unwrap();
        assert_eq!(head.method, "PUT");
        assert_eq!(path_of(&head.target), "/v2/t/blobs/uploads/x");
        assert_eq!(head.body_framing().unwrap(), Framing::Chunked);
        assert!(head.expects_continue());
        assert!(!head.keep_alive());
        assert!(read_request_head(&mut reader).unwrap().is_none());
    }

    #[test]
    fn points_upstream_locations_at_itself() {
        let shared = Shared::new("127.0.0.1:1".into(), Some("127.0.0.1:5000".into()));
        assert_eq!(
            shared.point_at_self("http://127.0.0.1:5000/v2/t/blobs/uploads/u?_state=s"),
            "http://127.0.0.1:1/v2/t/blobs/uploads/u?_state=s"
        );
        assert_eq!(
            shared.point_at_self("http://127.0.0.1:50001/v2/"),
            "http://127.0.0.1:50001/v2/"
        );
        assert_eq!(shared.point_at_self("/v2/relative"), "/v2/relative");
    }
}

//! Private OCI registries for end-to-end tests: Debian's `docker-registry` (CNCF
//! distribution 2.8) started on a free port of 127.0.0.1 with storage, config, log and
//! certificates in a temporary directory of its own, optionally behind htpasswd or
//! token authentication (with a [`TokenServer`](crate::token::TokenServer)) and/or
//! TLS with a self-signed CA. The process is killed when the [`TestRegistry`] is
//! dropped.
//!
//! ```no_run
//! use sarde_e2e::registry::{RegistryOptions, TestRegistry, require_registry_tools};
//!
//! // Prints SKIPPED, or fails under CI, naming the missing tools.
//! if !require_registry_tools("my_test") {
//!     return;
//! }
//! let registry = TestRegistry::start(RegistryOptions::default());
//! let reference = format!("{}/test/image:latest", registry.address());
//! ```
//!
//! The registry logs every request twice: a logrus line
//! (`time=... level=info msg="response completed" ... http.response.status=200`) and an
//! access line in Apache combined log format
//! (`127.0.0.1 - - [date] "GET /v2/t/blobs/sha256:... HTTP/1.1" 200 5 "" "ua"`; over TLS
//! the protocol reads `HTTP/2.0`). [`TestRegistry::blob_gets`] counts the access lines.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`TestRegistry::start`] and [`TestRegistry::restart`] wait for `/v2/`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How a [`TestRegistry`] is set up.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `Some((user, password))`: require HTTP basic authentication with this one
    /// account (a bcrypt htpasswd file); `None`: anonymous access.
    pub htpasswd: Option<(String, String)>,
    /// Serve HTTPS with a server certificate (for IP 127.0.0.1 and DNS localhost)
    /// signed by a fresh self-signed CA, see [`TestRegistry::ca_file`].
    pub tls: bool,
    /// Require bearer tokens from a token server, usually
    /// [`TokenServer::registry_auth`](crate::token::TokenServer::registry_auth).
    /// Exclusive with `htpasswd`.
    pub token: Option<TokenAuth>,
    /// `Some(url)`: a pull-through cache of the registry at `url`
    /// (distribution's `proxy: remoteurl:`), read-only for clients.
    pub proxy: Option<String>,
}

/// The `auth.token` section of distribution's configuration: where clients get
/// tokens and how the registry checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAuth {
    /// The URL clients get tokens from (`Bearer realm=...`).
    pub realm: String,
    /// The service clients name in token requests; tokens must have it as `aud`.
    pub service: String,
    /// The `iss` tokens must carry.
    pub issuer: String,
    /// PEM certificates the tokens' `x5c` chains must lead to.
    pub root_cert_bundle: PathBuf,
}

/// Whether the programs a [`TestRegistry`] needs (`docker-registry`, `htpasswd`,
/// `openssl`; curl for the readiness probe) are in `PATH`. Tests call this first
/// and print a skip reason when it is false; `scripts/install-deps.sh` installs them.
pub fn registry_tools_available() -> bool {
    ["docker-registry", "htpasswd", "openssl", "curl"]
        .iter()
        .all(|program| in_path(program))
}

/// Whether an end-to-end registry test can run here: libvirt enabled and the
/// registry tools present. Prints why not; under CI (`CI=true`) a missing tool
/// fails the test instead, naming it.
pub fn registry_tests_enabled(test: &str) -> bool {
    if !crate::vm::libvirt_enabled(test) {
        return false;
    }
    require_registry_tools(test)
}

/// [`registry_tools_available`], or a missing prerequisite naming the tools.
pub fn require_registry_tools(test: &str) -> bool {
    sarde_test_prerequisite::require(
        test,
        registry_tools_available(),
        "docker-registry, htpasswd, openssl or curl (scripts/install-deps.sh)",
    )
}

fn in_path(program: &str) -> bool {
    sarde_test_prerequisite::on_path(program)
}

/// A private `docker-registry` process on 127.0.0.1. Holds a temporary directory
/// with `config.yml`, the storage root `storage/`, the log `registry.log` (stdout and
/// stderr of every run, appended across restarts), `htpasswd` and `tls/`.
/// Dropping it kills the process and removes the directory.
pub struct TestRegistry {
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
    child: Option<Child>,
}

impl TestRegistry {
    /// Writes the configuration (and htpasswd file, certificates), starts the
    /// registry on a free port and waits up to 20 s until `GET /v2/` answers 200 or
    /// 401. Panics, with the end of the registry's log, when it does not.
    pub fn start(options: RegistryOptions) -> TestRegistry {
        // distribution takes only one access controller.
        assert!(
            options.htpasswd.is_none() || options.token.is_none(),
            "RegistryOptions: htpasswd and token authentication are exclusive"
        );
        let dir = tempfile::Builder::new()
            .prefix("sarde-registry-")
            .tempdir()
            .expect("temporary directory for the registry");
        fs::create_dir(dir.path().join("storage")).expect("storage directory");
        File::create(dir.path().join("registry.log")).expect("registry log");
        let htpasswd = options.htpasswd.as_ref().map(|(user, password)| {
            let file = dir.path().join("htpasswd");
            write_htpasswd(&file, user, password);
            file
        });
        let tls = options
            .tls
            .then(|| make_certificates(&dir.path().join("tls")));
        let mut registry = TestRegistry {
            dir,
            port: 0,
            tls: options.tls,
            child: None,
        };
        // A port freed by a dropped listener can be taken again before the registry
        // binds it (by another test's registry, say): then try another one.
        let mut attempts = 0;
        loop {
            attempts += 1;
            registry.port = free_port();
            registry.write_config(
                htpasswd.as_deref(),
                options.token.as_ref(),
                tls.as_ref(),
                options.proxy.as_deref(),
            );
            match registry.spawn_and_wait() {
                Ok(()) => return registry,
                Err(Failure::AddressInUse) if attempts < 5 => continue,
                Err(failure) => registry.fail(&failure.to_string()),
            }
        }
    }

    /// `127.0.0.1:PORT`, as in image references.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.address())
    }

    /// The PEM file of the self-signed CA that signed the server certificate, when
    /// the registry serves TLS.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.path().join("tls").join("ca.pem"))
    }

    /// The storage root (`storage.filesystem.rootdirectory`); blobs live under
    /// `docker/registry/v2/blobs/`.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Kills the registry and waits for it to exit. Storage, port and log are kept
    /// for [`restart`](Self::restart). Does nothing when it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the registry if it runs and starts it again on the same port with the
    /// same storage, configuration and certificates; waits as [`start`](Self::start)
    /// does.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(failure) = self.spawn_and_wait() {
            self.fail(&format!("on restart: {failure}"));
        }
    }

    /// Where the registry stores the content of blob `digest` (`sha256:HEX`, or bare
    /// HEX meaning sha256): `<storage>/docker/registry/v2/blobs/sha256/<HEX[..2]>/<HEX>/data`.
    /// Tests corrupt or remove it to make the registry serve bad data.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let (algorithm, hex) = split_digest(digest);
        assert!(hex.len() > 2, "not a digest: {digest}");
        self.storage()
            .join("docker/registry/v2/blobs")
            .join(algorithm)
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// How many `GET /v2/<repository>/blobs/<digest>` requests the registry has
    /// answered with 200 or 206 so far (all runs, any repository; HEAD requests and
    /// failures do not count), from the access lines of its log. Waits until the log
    /// has been quiet for 50 ms first: the registry writes an access line just
    /// before the last bytes of a response can leave, so right after a client
    /// finished a download its line may still be on the way.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let (algorithm, hex) = split_digest(digest);
        let digest = format!("{algorithm}:{hex}");
        self.settle_log();
        self.log()
            .lines()
            .filter_map(parse_access_line)
            .filter(|line| {
                line.method == "GET"
                    && matches!(line.status, 200 | 206)
                    && is_blob_path(line.path, &digest)
            })
            .count()
    }

    /// How many `method` requests whose path contains `part` the registry has
    /// answered with a 2xx status so far (all runs), e.g. `("GET", "/manifests/")`.
    pub fn answered(&self, method: &str, part: &str) -> usize {
        self.settle_log();
        self.log()
            .lines()
            .filter_map(parse_access_line)
            .filter(|line| {
                line.method == method
                    && (200..300).contains(&line.status)
                    && line.path.contains(part)
            })
            .count()
    }

    /// Everything the registry wrote to stdout and stderr so far, all runs.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn write_config(
        &self,
        htpasswd: Option<&Path>,
        token: Option<&TokenAuth>,
        tls: Option<&Certificates>,
        proxy: Option<&str>,
    ) {
        let mut yaml = format!(
            "# A private registry for one sarde-e2e test.\n\
             version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n  secret: sarde-test-secret\n  \
             headers:\n    X-Content-Type-Options: [nosniff]\n",
            root = yaml_string(&self.storage()),
            addr = self.address(),
        );
        if let Some(certs) = tls {
            yaml += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                yaml_string(&certs.server_cert),
                yaml_string(&certs.server_key),
            );
        }
        if let Some(file) = htpasswd {
            yaml += &format!(
                "auth:\n  htpasswd:\n    realm: sarde-test\n    path: {}\n",
                yaml_string(file)
            );
        }
        if let Some(token) = token {
            yaml += &format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                yaml_quote(&token.realm),
                yaml_quote(&token.service),
                yaml_quote(&token.issuer),
                yaml_string(&token.root_cert_bundle),
            );
        }
        if let Some(url) = proxy {
            yaml += &format!("proxy:\n  remoteurl: {}\n", yaml_quote(url));
        }
        fs::write(self.config_path(), yaml).expect("registry configuration written");
    }

    /// Starts the process (log appended) and waits until it answers.
    fn spawn_and_wait(&mut self) -> Result<(), Failure> {
        let mut log = OpenOptions::new()
            .append(true)
            .open(self.log_path())
            .expect("registry log opens");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        writeln!(
            log,
            "=== sarde-e2e: docker-registry serve {} on {} ===",
            self.config_path().display(),
            self.address()
        )
        .expect("registry log writable");
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(self.config_path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        // REGISTRY_* variables override the configuration file.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(name);
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| Failure::Spawn(format!("docker-registry cannot run: {e}")))?;
        self.child = Some(child);
        let result = self.wait_ready(log_start);
        if result.is_err() {
            self.stop();
        }
        result
    }

    fn wait_ready(&mut self, log_start: u64) -> Result<(), Failure> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr: SocketAddr = self.address().parse().expect("socket address");
        loop {
            let child = self.child.as_mut().expect("registry process");
            if let Some(status) = child.try_wait().expect("registry process status") {
                self.child = None;
                let log = self.log();
                let this_run = log.get(log_start as usize..).unwrap_or(&log);
                return Err(if this_run.contains("address already in use") {
                    Failure::AddressInUse
                } else {
                    Failure::Exited(status.to_string())
                });
            }
            // Ours only once this run logged that it listens: until then an
            // answer on the port may come from another test's server that took
            // the port first (ours then exits with "address already in use").
            let listening = self
                .log()
                .get(log_start as usize..)
                .is_some_and(|run| run.contains(&format!("listening on {}", self.address())));
            if listening && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                let code = self.probe();
                if code == "200" || code == "401" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Failure::Timeout);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The HTTP status of `GET /v2/` as curl reports it ("000" when no answer).
    fn probe(&self) -> String {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
        ]);
        if self.tls {
            cmd.arg("-k");
        }
        cmd.arg(format!("{}/v2/", self.url()));
        match cmd.output() {
            Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
            Err(e) => panic!("curl cannot run: {e}"),
        }
    }

    /// Waits (at most 2 s) until the log file has not grown for 50 ms.
    fn settle_log(&self) {
        let size = || fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = size();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = size();
            if now == last || Instant::now() > deadline {
                return;
            }
            last = now;
        }
    }

    fn fail(&self, what: &str) -> ! {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        panic!(
            "docker-registry on {} did not come up: {what}\n--- end of {} ---\n{tail}",
            self.address(),
            self.log_path().display()
        );
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug)]
enum Failure {
    Spawn(String),
    AddressInUse,
    Exited(String),
    Timeout,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Spawn(e) => f.write_str(e),
            Failure::AddressInUse => f.write_str("its port is taken"),
            Failure::Exited(status) => write!(f, "it exited ({status})"),
            Failure::Timeout => write!(
                f,
                "GET /v2/ did not answer 200 or 401 within {}s",
                START_TIMEOUT.as_secs()
            ),
        }
    }
}

/// A port of 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// A path as a YAML double-quoted string.
fn yaml_string(path: &Path) -> String {
    yaml_quote(path.to_str().expect("test paths are UTF-8"))
}

/// A YAML double-quoted string.
fn yaml_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn split_digest(digest: &str) -> (&str, &str) {
    digest.split_once(':').unwrap_or(("sha256", digest))
}

/// `path` (query ignored) is `/v2/<repository>/blobs/<digest>`.
fn is_blob_path(path: &str, digest: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    path.strip_prefix("/v2/")
        .and_then(|rest| rest.strip_suffix(digest))
        .and_then(|rest| rest.strip_suffix("/blobs/"))
        .is_some_and(|repository| !repository.is_empty())
}

struct AccessLine<'a> {
    method: &'a str,
    path: &'a str,
    status: u16,
}

/// Parses an access line of the combined log format:
/// `HOST - USER [DATE] "METHOD URI PROTO" STATUS SIZE "REFERER" "AGENT"`.
/// Other lines (logrus `time=...` lines, Go's own messages) give `None`.
fn parse_access_line(line: &str) -> Option<AccessLine<'_>> {
    if line.starts_with("time=") {
        return None;
    }
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once('"')?;
    let mut parts = request.split(' ');
    let (method, path, proto) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !proto.starts_with("HTTP/") {
        return None;
    }
    let status = rest.trim_start().split(' ').next()?.parse().ok()?;
    Some(AccessLine {
        method,
        path,
        status,
    })
}

fn write_htpasswd(file: &Path, user: &str, password: &str) {
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .unwrap_or_else(|e| panic!("htpasswd cannot run (package apache2-utils): {e}"));
    assert!(
        out.status.success(),
        "htpasswd -Bbn failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(file, &out.stdout).expect("htpasswd file written");
}

struct Certificates {
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// A self-signed CA (`ca.pem`) and a server certificate signed by it for IP
/// 127.0.0.1 and DNS localhost (`server.pem`, `server.key`), ECDSA P-256, in `dir`.
/// Two certificates, because rustls refuses a CA certificate used as the leaf.
fn make_certificates(dir: &Path) -> Certificates {
    fs::create_dir_all(dir).expect("tls directory");
    let path = |name: &str| dir.join(name).to_str().expect("UTF-8 path").to_string();
    let (ca_key, ca_cert) = (path("ca.key"), path("ca.pem"));
    let (server_key, server_csr, server_cert) =
        (path("server.key"), path("server.csr"), path("server.pem"));
    let server_ext = path("server.ext");
    let curve = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &curve,
            &[
                "-keyout",
                &ca_key,
                "-out",
                &ca_cert,
                "-days",
                "3650",
                "-subj",
                "/CN=sarde-test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-new"][..],
            &curve,
            &[
                "-keyout",
                &server_key,
                "-out",
                &server_csr,
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    fs::write(
        &server_ext,
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         subjectKeyIdentifier=hash\n\
         authorityKeyIdentifier=keyid\n",
    )
    .expect("certificate extensions written");
    let serial = format!("0x{:016x}", random_serial());
    openssl(&[
        "x509",
        "-req",
        "-in",
        &server_csr,
        "-CA",
        &ca_cert,
        "-CAkey",
        &ca_key,
        "-set_serial",
        &serial,
        "-days",
        "3650",
        "-extfile",
        &server_ext,
        "-out",
        &server_cert,
    ]);
    Certificates {
        server_cert: server_cert.into(),
        server_key: server_key.into(),
    }
}

/// Certificates of different test runs must not share a serial (clients may cache).
fn random_serial() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish() >> 1 // positive
}

/// Runs the openssl CLI; panics with its error output when it fails.
pub(crate) fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("openssl cannot run: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_lines() {
        let digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let line = format!(
            "127.0.0.1 - - [27/Nov/2026:02:40:29 +0000] \"GET /v2/t/blobs/{digest} HTTP/1.1\" 200 5 \"\" \"curl/7.88.1\""
        );
        let parsed = parse_access_line(&line).unwrap();
        assert_eq!(parsed.method, "GET");
        assert_eq!(parsed.status, 200);
        assert!(is_blob_path(parsed.path, digest));
        let h2 = format!(
            "127.0.0.1 - - [27/Nov/2026:02:41:05 +0000] \"GET /v2/a/b/blobs/{digest} HTTP/2.0\" 206 2 \"\" \"x\""
        );
        let parsed = parse_access_line(&h2).unwrap();
        assert_eq!(parsed.status, 206);
        assert!(is_blob_path(parsed.path, digest));
        let logrus = format!(
            "time=\"2026-11-27T02:40:29Z\" level=info msg=\"response completed\" http.request.method=GET http.request.uri=\"/v2/t/blobs/{digest}\" http.response.status=200"
        );
        assert!(parse_access_line(&logrus).is_none());
        assert!(!is_blob_path("/v2/t/blobs/uploads/", digest));
        assert!(!is_blob_path(&format!("/v2/blobs/{digest}"), digest));
        assert!(!is_blob_path(&format!("/v2/t/manifests/{digest}"), digest));
    }
}

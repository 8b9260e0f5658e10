//! The GitLab Runner custom executor driven exactly as gitlab-runner drives it:
//! the same environment variables, a generated bash script file per stage, the
//! stage names in order, the exit-code variables. A real bootable guest (built
//! from Debian packages), exported with sarde, pushed to a private registry,
//! pulled, cloned and booted under TCG, reached over SSH.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sarde_e2e::runner::{
    self, BUILD_FAILURE, STAGES, SYSTEM_FAILURE, Setup, assert_ok, job_id, setup, terminate_group,
    text,
};
use sarde_e2e::vm::{self, TestVm};
use sarde_e2e::{ok, sarde};
use serde_json::Value;

/// `prepare`'s timing line: image, clone, boot, SSH seconds.
fn timings(stderr: &str) -> Option<String> {
    runner::ready_line(stderr)
}

#[test]
fn a_job_passes_fails_and_leaves_nothing_behind() {
    let Some((s, _guest)) = setup("a_job_passes_fails_and_leaves_nothing_behind", "") else {
        return;
    };
    let job = job_id("");

    // config: one JSON object with what the runner shows and uses.
    let out = s.executor(&job, &s.image).arg("config").output().unwrap();
    assert_ok("config", &out);
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["driver"]["name"], "gitlab-sardinecake-executor");
    assert!(
        config["driver"]["version"]
            .as_str()
            .unwrap()
            .contains("libvirt"),
        "{config}"
    );
    assert_eq!(config["hostname"], format!("gitlab-{job}"));
    assert_eq!(config["builds_dir"], "/root/builds");
    assert_eq!(config["cache_dir"], "/root/cache");
    assert_eq!(config["shell"], "bash");

    let started = Instant::now();
    let out = s.executor(&job, &s.image).arg("prepare").output().unwrap();
    assert_ok("prepare", &out);
    let (_, stderr) = text(&out);
    println!(
        "prepare (cold cache) {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        timings(&stderr).unwrap_or_default()
    );

    // Every stage in order; the job's output reaches stdout.
    for stage in STAGES {
        let body = match *stage {
            "step_script" => "echo hello from the job on $(hostname)\nuname -s".to_string(),
            other => format!("echo stage {other}"),
        };
        let out = s.run_stage(&job, stage, &body, None);
        assert_ok(stage, &out);
        let (stdout, _) = text(&out);
        if *stage == "step_script" {
            assert!(
                stdout.contains("hello from the job on sarde-guest"),
                "{stdout}"
            );
            assert!(stdout.contains("Linux"), "{stdout}");
        } else {
            assert!(stdout.contains(&format!("stage {stage}")), "{stdout}");
        }
    }

    // A failing script: the build-failure code, and its own code in the file.
    let exit_file = s.work.path().join("exit-code");
    let out = s.run_stage(
        &job,
        "step_script",
        "echo failing\nexit 3",
        Some(&exit_file),
    );
    assert_eq!(out.status.code(), Some(BUILD_FAILURE), "{:?}", text(&out));
    assert_eq!(std::fs::read_to_string(&exit_file).unwrap().trim(), "3");

    let started = Instant::now();
    assert_ok("cleanup", &s.cleanup(&job));
    println!("cleanup {:.2}s", started.elapsed().as_secs_f64());
    s.assert_gone(&job);
    // Twice is harmless.
    assert_ok("second cleanup", &s.cleanup(&job));
    // run after cleanup is an infrastructure failure, not a build failure.
    let out = s.run_stage(&job, "step_script", "true", None);
    assert_eq!(out.status.code(), Some(SYSTEM_FAILURE), "{:?}", text(&out));

    // A second job of the same image: cached now, so prepare is clone + boot.
    let job2 = format!("{job}2");
    let started = Instant::now();
    let out = s.executor(&job2, &s.image).arg("prepare").output().unwrap();
    assert_ok("prepare (cached)", &out);
    println!(
        "prepare (cached image) {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        timings(&text(&out).1).unwrap_or_default()
    );
    assert_ok("cleanup", &s.cleanup(&job2));
    s.assert_gone(&job2);
}

#[test]
fn a_cancelled_job_stops_promptly_and_cleans_up() {
    let Some((s, guest)) = setup("a_cancelled_job_stops_promptly_and_cleans_up", "") else {
        return;
    };
    // This job logs in with the key from the INI; the password there is wrong, so
    // only the key can open the session.
    let mut ini = std::fs::read_to_string(&s.config).unwrap();
    ini = ini.replacen(
        "[DEFAULT]\n",
        &format!(
            "[DEFAULT]\nusername = root\npassword = wrong\nidentity-file = {}\n",
            guest.key.display()
        ),
        1,
    );
    std::fs::write(&s.config, ini).unwrap();
    let job = job_id("c");
    assert_ok(
        "prepare",
        &s.executor(&job, &s.image).arg("prepare").output().unwrap(),
    );
    let script = s.script(&job, "step_script", "echo started\nsleep 120\necho never");
    let mut child = s
        .executor(&job, &s.image)
        .arg("run")
        .arg(&script)
        .arg("step_script")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    // Cancelled once the script runs in the guest (its first line came back).
    let (lines, read_lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            all += &line;
            all.push('\n');
            let _ = lines.send(line);
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match read_lines.recv_timeout(left) {
            Ok(line) if line.contains("started") => break,
            Ok(_) => {}
            Err(e) => {
                terminate_group(&child);
                panic!("the script never started: {e}");
            }
        }
    }
    let sent = Instant::now();
    terminate_group(&child);
    let out = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    let stdout = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Promptly: seconds, not the script's 120 s.
    assert!(took < Duration::from_secs(15), "took {took:?} to stop");
    assert_eq!(out.status.code(), Some(SYSTEM_FAILURE), "{stderr}");
    assert!(!stdout.contains("never"), "{stdout}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert_ok("cleanup", &s.cleanup(&job));
    s.assert_gone(&job);
}

#[test]
fn cleanup_after_a_killed_prepare_removes_everything() {
    let Some((s, _guest)) = setup("cleanup_after_a_killed_prepare_removes_everything", "") else {
        return;
    };
    let job = job_id("k");
    let vm_name = format!("gitlab-{job}");
    let mut child = s.spawn_in_group(&job, "prepare", Stdio::null());
    // Killed once the clone exists and boots, before SSH is up.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !vm::domain_exists(&vm_name) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(vm::domain_exists(&vm_name), "the clone never appeared");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        vm::domain_exists(&vm_name),
        "the clone outlives the killed prepare"
    );
    assert_ok("cleanup", &s.cleanup(&job));
    s.assert_gone(&job);
}

#[test]
fn a_cancelled_cleanup_still_removes_everything() {
    let Some((s, _guest)) = setup(
        "a_cancelled_cleanup_still_removes_everything",
        "max-vms = 2\n",
    ) else {
        return;
    };
    let job = job_id("t");
    assert_ok(
        "prepare",
        &s.executor(&job, &s.image).arg("prepare").output().unwrap(),
    );
    // gitlab-runner cancels the cleanup itself (its timeout, a runner that
    // stops): SIGTERM to the group, every 100 ms while it runs. Nothing calls
    // cleanup again, so it must finish.
    let mut child = s.spawn_in_group(&job, "cleanup", Stdio::piped());
    // From the moment it can note the signal (its first step): a SIGTERM before
    // that kills any process, as gitlab-runner's would.
    runner::wait_until_catching_sigterm(&mut child, Duration::from_secs(30));
    let started = Instant::now();
    let mut sent = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("cleanup still runs after 120 s");
        }
        terminate_group(&child);
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(sent > 0, "cleanup ended before a signal: {stderr}");
    assert_eq!(
        status.code(),
        Some(0),
        "{status}, after {sent} SIGTERMs: {stderr}"
    );
    assert!(
        stderr.contains("SIGTERM arrived during cleanup"),
        "{stderr}"
    );
    s.assert_gone(&job);
}

#[test]
fn a_prepare_waiting_for_a_vm_slot_stops_at_sigterm() {
    let Some((s, _guest)) = setup(
        "a_prepare_waiting_for_a_vm_slot_stops_at_sigterm",
        "max-vms = 1\n",
    ) else {
        return;
    };
    let (first, second) = (job_id("w1"), job_id("w2"));
    assert_ok(
        "prepare",
        &s.executor(&first, &s.image)
            .arg("prepare")
            .output()
            .unwrap(),
    );
    // The second job waits for the only slot, which the first job's VM holds.
    let log = s.work.path().join("second-prepare.err");
    let mut child = s.spawn_in_group(
        &second,
        "prepare",
        std::fs::File::create(&log).unwrap().into(),
    );
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stderr().contains("waiting for one") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the second prepare ended: {}",
            stderr()
        );
        assert!(
            Instant::now() < deadline,
            "no wait for a slot: {}",
            stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Cancelled while it waits: it stops at once, not once a slot is free.
    let sent = Instant::now();
    terminate_group(&child);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if sent.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = sent.elapsed();
    for job in [&first, &second] {
        assert_ok("cleanup", &s.cleanup(job));
        s.assert_gone(job);
    }
    let status = status.unwrap_or_else(|| panic!("ignored SIGTERM for 20 s: {}", stderr()));
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    assert_eq!(status.code(), Some(SYSTEM_FAILURE), "{}", stderr());
    assert!(stderr().contains("SIGTERM"), "{}", stderr());
}

#[test]
fn a_guest_without_an_address_fails_prepare_in_bounded_time() {
    // A disk with nothing to boot: the VM runs, but never asks for an address.
    let Some((s, _guest)) = setup(
        "a_guest_without_an_address_fails_prepare_in_bounded_time",
        "\n[*/ci/blank*]\ntimeout = 10\n",
    ) else {
        return;
    };
    let blank = s.work.path().join("blank.qcow2");
    vm::qcow2(&blank, "64M", None);
    let name = vm::unique("sarde-exec-blank");
    let _blank_vm = TestVm::define(&name, &[&blank], None);
    let image = s.image.replace("/ci/guest:1", "/ci/blank:1");
    let publisher = vm::workdir();
    let blank_id = ok(sarde(publisher.path()).args(["export", &name, &image]));
    s.bases.lock().unwrap().push(blank_id);
    ok(sarde(publisher.path()).args(["push", "--insecure", &image]));
    let job = job_id("n");
    let started = Instant::now();
    let out = s.executor(&job, &image).arg("prepare").output().unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(SYSTEM_FAILURE), "{:?}", text(&out));
    let (_, stderr) = text(&out);
    assert!(stderr.contains("no IPv4 address"), "{stderr}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert_ok("cleanup", &s.cleanup(&job));
    s.assert_gone(&job);
}

#[test]
fn two_concurrent_jobs_from_one_image() {
    let Some((s, _guest)) = setup("two_concurrent_jobs_from_one_image", "max-vms = 4\n") else {
        return;
    };
    let jobs = [job_id("a"), job_id("b")];
    let started = Instant::now();
    let children: Vec<Child> = jobs
        .iter()
        .map(|job| {
            s.executor(job, &s.image)
                .arg("prepare")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_ok("concurrent prepare", &out);
        println!(
            "concurrent prepare: {}",
            timings(&text(&out).1).unwrap_or_default()
        );
    }
    println!("both ready after {:.1}s", started.elapsed().as_secs_f64());
    // The image was downloaded once for both jobs: each blob served once.
    let mut served = std::collections::BTreeMap::<String, usize>::new();
    for line in s.registry.log().lines() {
        if line.starts_with("127.0.0.1 - ")
            && line.contains("\"GET /v2/ci/guest/blobs/")
            && (line.contains("\" 200 ") || line.contains("\" 206 "))
        {
            let digest = line
                .split("/blobs/")
                .nth(1)
                .unwrap_or("")
                .split(' ')
                .next()
                .unwrap_or("");
            *served.entry(digest.to_string()).or_default() += 1;
        }
    }
    assert!(!served.is_empty(), "no blob requests logged");
    assert!(served.values().all(|n| *n == 1), "blobs served: {served:?}");
    for job in &jobs {
        let out = s.run_stage(job, "step_script", "echo job $CI_JOB_ID; hostname", None);
        assert_ok("step_script", &out);
    }
    for job in &jobs {
        assert_ok("cleanup", &s.cleanup(job));
        s.assert_gone(job);
    }

    // The allow-list refuses other images as the job's fault (no retries).
    let refused = s
        .executor(&job_id("x"), "evil.example/x:1")
        .env(
            "GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES",
            write_allow_list(&s),
        )
        .arg("prepare")
        .output()
        .unwrap();
    assert_eq!(
        refused.status.code(),
        Some(BUILD_FAILURE),
        "{:?}",
        text(&refused)
    );
    assert!(text(&refused).1.contains("allowed-images"));
}

fn write_allow_list(s: &Setup) -> PathBuf {
    let path = s.work.path().join("allow.ini");
    let mut ini = std::fs::read_to_string(&s.config).unwrap();
    ini = ini.replacen(
        "[DEFAULT]\n",
        "[DEFAULT]\nallowed-images = 127.0.0.1:*/ci/*\n",
        1,
    );
    std::fs::write(&path, ini).unwrap();
    path
}

#[test]
fn a_job_runs_from_an_archive_on_a_shared_file_system() {
    let Some((s, _guest)) = setup("a_job_runs_from_an_archive_on_a_shared_file_system", "") else {
        return;
    };
    // The build host copies the image into an archive on the shared file system.
    let shared = s.work.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let archive = format!("oci-archive:{}:1", shared.join("guest.tar").display());
    let publisher = vm::workdir();
    ok(sarde(publisher.path()).args(["copy", "--insecure", &s.image, &archive]));

    // Archives there, and only there, are allowed; their section applies.
    let pattern = format!("oci-archive:{}/*", shared.display());
    let ini = std::fs::read_to_string(&s.config).unwrap().replacen(
        "[DEFAULT]\n",
        &format!("[DEFAULT]\nallowed-images = {pattern}\n"),
        1,
    );
    let marker = s.work.path().join("section.sh");
    std::fs::write(&marker, "touch /root/from-the-archive-section\n").unwrap();
    let config = s.work.path().join("archives.ini");
    std::fs::write(
        &config,
        format!(
            "{ini}\n[{pattern}]\nprepare-script = {}\n",
            marker.display()
        ),
    )
    .unwrap();
    let executor = |job: &str, image: &str| {
        let mut cmd = s.executor(job, image);
        cmd.env("GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES", &config);
        cmd
    };
    let job = job_id("ar");
    let prepared = executor(&job, &archive).arg("prepare").output().unwrap();
    assert_ok("prepare from the archive", &prepared);
    let script = s.script(
        &job,
        "step_script",
        "test -e /root/from-the-archive-section && echo from-archive-ok",
    );
    let out = executor(&job, &archive)
        .arg("run")
        .arg(&script)
        .arg("step_script")
        .output()
        .unwrap();
    assert_ok("step_script", &out);
    assert!(text(&out).0.contains("from-archive-ok"), "{:?}", text(&out));
    assert_ok(
        "cleanup",
        &executor(&job, &archive).arg("cleanup").output().unwrap(),
    );
    s.assert_gone(&job);
    // The archive's image is cached under a name made of it.
    // (The executor's cache is the setup's `ocidir`, which `sarde` reads as its own.)
    let listed = ok(sarde(s.work.path()).args(["list", "--format", "json"]));
    let path = shared
        .join("guest.tar")
        .display()
        .to_string()
        .to_lowercase();
    assert!(listed.contains(&format!("localhost{path}")), "{listed}");

    // A registry image, and an archive elsewhere, are refused as the job's fault.
    for image in [
        s.image.clone(),
        "oci-archive:/tmp/elsewhere.tar:1".to_string(),
    ] {
        let refused = executor("refused", &image).arg("prepare").output().unwrap();
        assert_eq!(
            refused.status.code(),
            Some(BUILD_FAILURE),
            "{image}: {:?}",
            text(&refused)
        );
        assert!(
            text(&refused).1.contains("allowed-images"),
            "{:?}",
            text(&refused)
        );
    }
}

/// A policy file naming the test registry's `ci/` repositories, trusting the
/// public key `key`.
fn write_policy(path: &Path, addr: &str, key: &Path) {
    std::fs::write(
        path,
        format!(
            r#"{{"default": [{{"type": "reject"}}],
                "transports": {{"docker": {{"{addr}/ci": [{{"type": "sigstoreSigned", "keyPath": "{}"}}]}}}}}}"#,
            key.display()
        ),
    )
    .unwrap();
}

/// A key pair made by `sarde key generate` in `dir`: (private, public, passphrase file).
fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let pass = dir.join(format!("{name}.pass"));
    std::fs::write(&pass, "passphrase\n").unwrap();
    ok(sarde(dir)
        .args(["key", "generate", "--output-prefix"])
        .arg(dir.join(name))
        .arg("--passphrase-file")
        .arg(&pass));
    (
        dir.join(format!("{name}.private")),
        dir.join(format!("{name}.pub")),
        pass,
    )
}

#[test]
fn prepare_refuses_images_the_signature_policy_refuses_as_system_failures() {
    let trust = vm::workdir();
    let policy = trust.path().join("policy.json");
    let Some((s, _guest)) = setup(
        "prepare_refuses_images_the_signature_policy_refuses_as_system_failures",
        &format!("policy = {}\nrequire-signature = yes\n", policy.display()),
    ) else {
        return;
    };
    let addr = s.registry.address();
    let (private, public, pass) = key_pair(trust.path(), "ci");
    let (_, other_public, _) = key_pair(trust.path(), "other");
    write_policy(&policy, &addr, &public);
    let base = s.bases.lock().unwrap()[0].clone();
    let refused = |job: &str, expected: &[&str]| {
        let out = s.executor(job, &s.image).arg("prepare").output().unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(SYSTEM_FAILURE), "{stderr}");
        assert!(stderr.contains("refused by the policy"), "{stderr}");
        for part in expected {
            assert!(stderr.contains(part), "{part:?} not in {stderr}");
        }
        assert!(
            !vm::domain_exists(&base),
            "the base VM was imported: {stderr}"
        );
        assert_ok("cleanup", &s.cleanup(job));
        s.assert_gone(job);
    };
    let rule = format!(
        "{} transports.docker[\"{addr}/ci\"][0] (sigstoreSigned)",
        policy.display()
    );

    // The image as the setup pushed it: unsigned.
    refused(&job_id("pu"), &[&s.image, &rule, "no signature"]);

    // Signed by the publisher; the runner host's cache gets it (with its
    // signature), and a pull-policy = never job verifies from the cache.
    let publisher = vm::workdir();
    ok(sarde(publisher.path()).args(["fetch", "--insecure", &s.image]));
    ok(sarde(publisher.path())
        .args(["push", "--insecure", "--sign-by-sigstore-private-key"])
        .arg(&private)
        .arg("--sign-passphrase-file")
        .arg(&pass)
        .arg(&s.image));
    ok(sarde(s.work.path())
        .args(["fetch", "--insecure", "--policy"])
        .arg(&policy)
        .arg(&s.image));
    let ini = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        ini.replacen("[DEFAULT]\n", "[DEFAULT]\npull-policy = never\n", 1),
    )
    .unwrap();
    let job = job_id("ps");
    let out = s.executor(&job, &s.image).arg("prepare").output().unwrap();
    assert_ok("prepare of the signed image from the cache", &out);
    assert_ok("cleanup", &s.cleanup(&job));
    s.assert_gone(&job);
    vm::undefine(&base);

    // Another key trusted: refused from the cache, and from the registry.
    write_policy(&policy, &addr, &other_public);
    refused(
        &job_id("pc"),
        &[&rule, "not made by the trusted key", "from the cache"],
    );
    std::fs::write(
        &s.config,
        ini.replacen("[DEFAULT]\n", "[DEFAULT]\npull-policy = always\n", 1),
    )
    .unwrap();
    refused(
        &job_id("pr"),
        &[&rule, "not made by the trusted key", "pulling"],
    );

    // require-signature: a policy that takes anything is not enough.
    std::fs::write(
        &policy,
        r#"{"default": [{"type": "insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    refused(
        &job_id("pa"),
        &["require-signature", "insecureAcceptAnything"],
    );
}

//! Signed images end to end, against a private registry (Debian's
//! docker-registry, which has no referrers API: signatures live under cosign's
//! `sha256-<hex>.sig` tag), real libvirt and qemu-img: `sarde key generate`,
//! `push --sign-by-sigstore-private-key`, and a `sigstoreSigned` policy that
//! lets the signed image in and refuses the unsigned one, one signed with
//! another key, one signed for another repository and a manifest swapped after
//! signing, with no VM defined and nothing imported. Signatures travel with
//! `copy`, also into an archive, and verify there.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sarde_e2e::registry::{RegistryOptions, TestRegistry, registry_tests_enabled};
use sarde_e2e::vm::{self, TestVm, fill, fill_random, qcow2};
use sarde_e2e::{fails, ok, sarde};
use serde_json::Value;

fn json(text: &str) -> Value {
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A small VM (a base and an overlay) whose content depends on `seed`.
fn small_vm(work: &Path, prefix: &str, seed: u32) -> TestVm {
    let base = work.join(format!("{prefix}-base.qcow2"));
    qcow2(&base, "64M", None);
    fill_random(&base, 0, 2, seed.into());
    let top = work.join(format!("{prefix}-top.qcow2"));
    qcow2(&top, "64M", Some(base.to_str().unwrap()));
    fill(&top, 0x30 + seed as u8, "1M", "1M");
    TestVm::define(&vm::unique(prefix), &[&top], None)
}

fn generate_key(home: &Path, prefix: &str) -> (PathBuf, PathBuf, PathBuf) {
    let passphrase = home.join(format!("{prefix}.pass"));
    std::fs::write(&passphrase, format!("secret of {prefix}\n")).unwrap();
    let output = home.join(prefix);
    ok(sarde(home).args([
        "key",
        "generate",
        "--output-prefix",
        output.to_str().unwrap(),
        "--passphrase-file",
        passphrase.to_str().unwrap(),
    ]));
    let private = home.join(format!("{prefix}.private"));
    let public = home.join(format!("{prefix}.pub"));
    (private, public, passphrase)
}

/// `sarde push --sign-by-sigstore-private-key`; its JSON summary.
fn push_signed(home: &Path, private: &Path, passphrase: &Path, image: &str) -> Value {
    json(&ok(sarde(home)
        .args([
            "push",
            "--insecure",
            "--format",
            "json",
            "--sign-by-sigstore-private-key",
        ])
        .arg(private)
        .arg("--sign-passphrase-file")
        .arg(passphrase)
        .arg(image)))
}

fn digest_of(manifest_json: &Value) -> String {
    manifest_json["manifest"]
        .as_str()
        .unwrap_or_else(|| panic!("no manifest in {manifest_json}"))
        .to_string()
}

fn sig_tag(digest: &str) -> String {
    format!("{}.sig", digest.replace(':', "-"))
}

/// `curl` against the registry's API; the body.
fn registry_get(registry: &TestRegistry, path: &str, accept: &str) -> String {
    vm::run(
        "curl",
        &[
            "-sf",
            "-H",
            &format!("Accept: {accept}"),
            &format!("{}{path}", registry.url()),
        ],
    )
}

/// The pull failed as the policy refusing it, and nothing of the image
/// reached this host: no VM directory, no domain, no blob in the cache.
fn assert_refused(home: &Path, message: &str, expected: &[&str]) {
    assert!(message.contains("refused by the policy"), "{message}");
    for part in expected {
        assert!(message.contains(part), "{part:?} not in: {message}");
    }
    let vms = home.join("VMs");
    let entries: Vec<_> = std::fs::read_dir(&vms)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        entries.iter().all(|e| e.to_string_lossy().starts_with('.')),
        "something was imported into {}: {entries:?}",
        vms.display()
    );
    let text = ok(sarde(home).args(["list", "--format", "json"]));
    assert!(!text.contains("sarde-sig"), "a VM is listed: {text}");
    let blobs = home.join("OCI");
    let found = walk(&blobs)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/blobs/sha256/"))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 64 << 10))
        .collect::<Vec<_>>();
    assert!(found.is_empty(), "disk pieces reached the cache: {found:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_sigstore_signed_policy_lets_signed_images_in_and_refuses_the_others() {
    if !registry_tests_enabled(
        "a_sigstore_signed_policy_lets_signed_images_in_and_refuses_the_others",
    ) {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let work = vm::workdir();
    let home = vm::workdir();
    let h = home.path();

    // Keys as skopeo names them: PREFIX.private (owner only) and PREFIX.pub.
    let (private, public, passphrase) = generate_key(h, "signer");
    let (other_private, _, other_passphrase) = generate_key(h, "intruder");
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the private key is readable by others");
    let pem = std::fs::read_to_string(&private).unwrap();
    assert!(
        pem.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"),
        "{pem}"
    );
    assert!(
        std::fs::read_to_string(&public)
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    let again = fails(sarde(h).args([
        "key",
        "generate",
        "--output-prefix",
        h.join("signer").to_str().unwrap(),
        "--passphrase-file",
        passphrase.to_str().unwrap(),
    ]));
    assert!(again.contains("exists"), "{again}");

    let mut vm_a = small_vm(work.path(), "sarde-sig-a", 1);
    let vm_b = small_vm(work.path(), "sarde-sig-b", 2);
    let signed = format!("{addr}/e2e/signed:1");
    let unsigned = format!("{addr}/e2e/unsigned:1");
    let other_key = format!("{addr}/e2e/other-key:1");
    let moved = format!("{addr}/e2e/moved:1");
    let swapped = format!("{addr}/e2e/swapped:1");
    ok(sarde(h).args(["export", "--chunksize", "1MiB", &vm_a.name, &signed]));
    ok(sarde(h).args(["export", "--chunksize", "1MiB", &vm_b.name, &swapped]));

    // A wrong passphrase is refused before anything is sent.
    let wrong = h.join("wrong.pass");
    std::fs::write(&wrong, "nope\n").unwrap();
    let refused = fails(sarde(h).args([
        "push",
        "--insecure",
        "--sign-by-sigstore-private-key",
        private.to_str().unwrap(),
        "--sign-passphrase-file",
        wrong.to_str().unwrap(),
        &signed,
    ]));
    assert!(refused.contains("signer.private"), "{refused}");
    assert_eq!(
        registry.answered("PUT", "/manifests/"),
        0,
        "something was pushed"
    );

    let push_signed = || push_signed(h, &private, &passphrase, &signed);
    let pushed = push_signed();
    assert_eq!(pushed["signed"][0]["identity"], signed.as_str(), "{pushed}");
    assert_eq!(pushed["signed"][0]["signatures"], 1, "{pushed}");
    let digest_a = digest_of(&pushed);
    // Signing again with the same key adds nothing.
    let resigned = push_signed();
    assert_eq!(resigned["signed"][0]["signatures"], 1, "{resigned}");

    // The signature as cosign stores it: an OCI image manifest under the
    // `sha256-<hex>.sig` tag, one simple signing layer with the annotation.
    let tags = registry_get(&registry, "/v2/e2e/signed/tags/list", "application/json");
    assert!(tags.contains(&sig_tag(&digest_a)), "{tags}");
    let sig_manifest: Value = serde_json::from_str(&registry_get(
        &registry,
        &format!("/v2/e2e/signed/manifests/{}", sig_tag(&digest_a)),
        "application/vnd.oci.image.manifest.v1+json",
    ))
    .unwrap();
    assert_eq!(
        sig_manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        sig_manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layer = &sig_manifest["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.dev.cosign.simplesigning.v1+json"
    );
    assert!(
        layer["annotations"]["dev.cosignproject.cosign/signature"].is_string(),
        "{sig_manifest}"
    );
    let payload: Value = serde_json::from_str(&registry_get(
        &registry,
        &format!("/v2/e2e/signed/blobs/{}", layer["digest"].as_str().unwrap()),
        "*/*",
    ))
    .unwrap();
    assert_eq!(
        payload["critical"]["type"],
        "cosign container image signature"
    );
    assert_eq!(
        payload["critical"]["image"]["docker-manifest-digest"],
        digest_a.as_str()
    );
    assert_eq!(
        payload["critical"]["identity"]["docker-reference"],
        signed.as_str()
    );

    // The others: unsigned, signed by another key, a signature moved to
    // another repository, a manifest swapped after signing.
    ok(sarde(h).args(["push", "--insecure", "-t", &unsigned, "-t", &moved, &signed]));
    ok(sarde(h).args([
        "push",
        "--insecure",
        "-t",
        &other_key,
        "--sign-by-sigstore-private-key",
        other_private.to_str().unwrap(),
        "--sign-passphrase-file",
        other_passphrase.to_str().unwrap(),
        &signed,
    ]));
    ok(sarde(h).args([
        "copy",
        "--insecure",
        &format!("docker://{addr}/e2e/signed:{}", sig_tag(&digest_a)),
        &format!("docker://{addr}/e2e/moved:{}", sig_tag(&digest_a)),
    ]));
    let pushed_b = json(&ok(sarde(h).args([
        "push",
        "--insecure",
        "--format",
        "json",
        &swapped,
    ])));
    let digest_b = digest_of(&pushed_b);
    ok(sarde(h).args([
        "copy",
        "--insecure",
        &format!("docker://{addr}/e2e/signed:{}", sig_tag(&digest_a)),
        &format!("docker://{addr}/e2e/swapped:{}", sig_tag(&digest_b)),
    ]));

    let policy = h.join("policy.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"default": [{{"type": "reject"}}],
                "transports": {{
                    "docker": {{"{addr}/e2e": [{{"type": "sigstoreSigned", "keyPath": "{}"}}]}},
                    "oci-archive": {{"": [{{"type": "sigstoreSigned", "keyPath": "{}",
                        "signedIdentity": {{"type": "exactRepository", "dockerRepository": "{addr}/e2e/signed"}}}}]}}
                }}}}"#,
            public.display(),
            public.display()
        ),
    )
    .unwrap();
    let policy_arg = policy.to_str().unwrap();
    let rule = format!("{policy_arg} transports.docker[\"{addr}/e2e\"][0] (sigstoreSigned)");

    for (image, expected) in [
        (&unsigned, "no signature"),
        (&other_key, "not made by the trusted key"),
        (&moved, &format!("signed for {signed}") as &str),
        (&swapped, "replaced after signing"),
    ] {
        let fresh = vm::workdir();
        let message =
            fails(sarde(fresh.path()).args(["pull", "--insecure", "--policy", policy_arg, image]));
        assert_refused(fresh.path(), &message, &[image.as_str(), &rule, expected]);
        let message =
            fails(sarde(fresh.path()).args(["fetch", "--insecure", "--policy", policy_arg, image]));
        assert_refused(fresh.path(), &message, &[expected]);
    }

    // The signed image is let in, and its signature kept in the cache.
    let fresh = vm::workdir();
    let f = fresh.path();
    let pulled = json(&ok(sarde(f).args([
        "pull",
        "--insecure",
        "--format",
        "json",
        "--policy",
        policy_arg,
        &signed,
    ])));
    assert_eq!(pulled["policy"]["signatures_verified"], 1, "{pulled}");
    assert_eq!(
        pulled["policy"]["scope"],
        format!("transports.docker[\"{addr}/e2e\"]"),
        "{pulled}"
    );
    let vm_name = pulled["import"]["name"].as_str().unwrap().to_string();
    vm_a.cleanup_also(&vm_name);
    assert!(vm::domain_exists(&vm_name));
    let cached = walk(&f.join("OCI")).into_iter().any(|p| {
        p.ends_with("index.json")
            && std::fs::read_to_string(&p).is_ok_and(|t| t.contains(&sig_tag(&digest_a)))
    });
    assert!(cached, "the signature is not in the cache");
    let listed = ok(sarde(f).args(["list"]));
    assert!(
        !listed.contains(".sig"),
        "a signature is listed as an image: {listed}"
    );
    // The signature goes with the image.
    ok(sarde(f).args(["rm", &signed]));
    let left = walk(&f.join("OCI")).into_iter().any(|p| {
        p.ends_with("index.json") && std::fs::read_to_string(&p).is_ok_and(|t| t.contains(".sig"))
    });
    assert!(!left, "the signature stayed in the cache after rm");

    // copy carries the signature into an archive, where it verifies; an
    // archive of the unsigned image is refused.
    let archive = work.path().join("signed.tar");
    ok(sarde(h).args([
        "copy",
        "--insecure",
        "--policy",
        policy_arg,
        &format!("docker://{signed}"),
        &format!("oci-archive:{}:signed", archive.display()),
    ]));
    let fresh = vm::workdir();
    let from_archive = json(&ok(sarde(fresh.path()).args([
        "fetch",
        "--format",
        "json",
        "--policy",
        policy_arg,
        &format!("oci-archive:{}:signed", archive.display()),
    ])));
    assert_eq!(
        from_archive["policy"]["signatures_verified"], 1,
        "{from_archive}"
    );
    let bare = work.path().join("unsigned.tar");
    ok(sarde(h).args([
        "copy",
        "--insecure",
        &format!("docker://{unsigned}"),
        &format!("oci-archive:{}:unsigned", bare.display()),
    ]));
    let fresh = vm::workdir();
    let message = fails(sarde(fresh.path()).args([
        "pull",
        "--policy",
        policy_arg,
        &format!("oci-archive:{}:unsigned", bare.display()),
    ]));
    assert_refused(
        fresh.path(),
        &message,
        &["no signature", "transports.oci-archive"],
    );

    // A copy onto a repository that has its own signature of the same image
    // keeps it beside the copied one.
    ok(sarde(h).args([
        "copy",
        "--insecure",
        &format!("docker://{signed}"),
        &format!("docker://{other_key}"),
    ]));
    let merged: Value = serde_json::from_str(&registry_get(
        &registry,
        &format!("/v2/e2e/other-key/manifests/{}", sig_tag(&digest_a)),
        "application/vnd.oci.image.manifest.v1+json",
    ))
    .unwrap();
    assert_eq!(
        merged["layers"].as_array().unwrap().len(),
        2,
        "the destination's signature was lost: {merged}"
    );

    // copy signs at a registry destination, as skopeo copy does: the unsigned
    // image, copied and signed, is let in.
    let countersigned = format!("{addr}/e2e/countersigned:1");
    let sign_flags = [
        "--sign-by-sigstore-private-key",
        private.to_str().unwrap(),
        "--sign-passphrase-file",
        passphrase.to_str().unwrap(),
    ];
    let copied = json(&ok(sarde(h)
        .args(["copy", "--insecure", "--format", "json"])
        .args(sign_flags)
        .args([
            format!("docker://{unsigned}"),
            format!("docker://{countersigned}"),
        ])));
    assert_eq!(
        copied["signed"][0]["identity"],
        countersigned.as_str(),
        "{copied}"
    );
    assert_eq!(copied["signed"][0]["signatures"], 1, "{copied}");
    let fresh = vm::workdir();
    let fetched = json(&ok(sarde(fresh.path()).args([
        "fetch",
        "--insecure",
        "--format",
        "json",
        "--policy",
        policy_arg,
        &countersigned,
    ])));
    assert_eq!(fetched["policy"]["signatures_verified"], 1, "{fetched}");
    // A destination without a registry name cannot be signed for: refused
    // before anything is written.
    let layout = work.path().join("signed-layout");
    let message = fails(
        sarde(h)
            .args(["copy", "--insecure"])
            .args(sign_flags)
            .args([
                format!("docker://{signed}"),
                format!("oci:{}:1", layout.display()),
            ]),
    );
    assert!(
        message.contains("registry reference") && message.contains(&layout.display().to_string()),
        "{message}"
    );
    assert!(
        !layout.exists(),
        "the refused copy wrote {}",
        layout.display()
    );

    // Requirement types sarde does not check refuse (fail closed).
    let gpg = h.join("gpg-policy.json");
    std::fs::write(
        &gpg,
        r#"{"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/dev/null"}]}"#,
    )
    .unwrap();
    let fresh = vm::workdir();
    let message = fails(sarde(fresh.path()).args([
        "fetch",
        "--insecure",
        "--policy",
        gpg.to_str().unwrap(),
        &signed,
    ]));
    assert_refused(fresh.path(), &message, &["signedBy", "GPG"]);
}

/// Where a registry offers the OCI referrers API (here a scripting proxy in
/// front of the real registry: Debian's distribution 2.8 has none), a signed
/// push also stores the signature as a referrer of the image, as cosign's OCI
/// 1.1 mode does, and a signature listed there verifies without cosign's tag.
#[test]
fn signatures_are_written_and_found_through_the_referrers_api() {
    use sarde_e2e::hostile::{Action, Body, HostileServer, Matcher, Rule};
    if !registry_tests_enabled("signatures_are_written_and_found_through_the_referrers_api") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let front = HostileServer::start(Some(registry.address()));
    let addr = front.address();
    let work = vm::workdir();
    let home = vm::workdir();
    let h = home.path();
    let (private, public, passphrase) = generate_key(h, "signer");
    let mut vm = small_vm(work.path(), "sarde-sig-ref", 3);
    let image = format!("{addr}/e2e/referred:1");
    ok(sarde(h).args(["export", "--chunksize", "1MiB", &vm.name, &image]));
    let referrers = |manifests: &str| Action::Respond {
        status: 200,
        headers: vec![(
            "Content-Type".into(),
            "application/vnd.oci.image.index.v1+json".into(),
        )],
        body: Body::text(&format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{manifests}]}}"#
        )),
    };
    front.add_rule(Rule::always(
        Matcher::path_contains("GET", "/referrers/"),
        referrers(""),
    ));
    let pushed = push_signed(h, &private, &passphrase, &image);
    let digest = digest_of(&pushed);

    // Besides the tag, a manifest stored by digest that names the image as subject.
    let put: Vec<String> = front
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path().contains("/manifests/sha256:"))
        .map(|r| r.path().rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(put.len(), 1, "{put:?}");
    let referrer_digest = &put[0];
    let referrer_text = registry_get(
        &registry,
        &format!("/v2/e2e/referred/manifests/{referrer_digest}"),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let referrer: Value = serde_json::from_str(&referrer_text).unwrap();
    assert_eq!(referrer["subject"]["digest"], digest.as_str(), "{referrer}");
    assert_eq!(
        referrer["artifactType"],
        "application/vnd.dev.cosign.artifact.sig.v1+json"
    );
    assert_eq!(
        referrer["config"]["mediaType"],
        "application/vnd.dev.cosign.artifact.sig.v1+json"
    );
    assert_eq!(
        referrer["layers"][0]["mediaType"],
        "application/vnd.dev.cosign.simplesigning.v1+json"
    );

    // The tag schema is gone from view: no referrer listed, no signature.
    let no_tag = || {
        Rule::always(
            Matcher::path_contains("GET", &format!("/manifests/{}", sig_tag(&digest))),
            Action::Respond {
                status: 404,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: Body::text(
                    r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
                ),
            },
        )
    };
    front.clear_rules();
    front.add_rule(no_tag());
    front.add_rule(Rule::always(
        Matcher::path_contains("GET", "/referrers/"),
        referrers(""),
    ));
    let policy = h.join("policy.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"default": [{{"type": "sigstoreSigned", "keyPath": "{}"}}]}}"#,
            public.display()
        ),
    )
    .unwrap();
    let policy_arg = policy.to_str().unwrap();
    let fresh = vm::workdir();
    let message =
        fails(sarde(fresh.path()).args(["fetch", "--insecure", "--policy", policy_arg, &image]));
    assert_refused(fresh.path(), &message, &["no signature"]);

    // The referrer listed: it verifies.
    front.clear_rules();
    front.add_rule(no_tag());
    front.add_rule(Rule::always(
        Matcher::path_contains("GET", &format!("/referrers/{digest}")),
        referrers(&format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{referrer_digest}","size":{},"artifactType":"application/vnd.dev.cosign.artifact.sig.v1+json"}}"#,
            referrer_text.len()
        )),
    ));
    let fresh = vm::workdir();
    let pulled = json(&ok(sarde(fresh.path()).args([
        "pull",
        "--insecure",
        "--format",
        "json",
        "--policy",
        policy_arg,
        &image,
    ])));
    assert_eq!(pulled["policy"]["signatures_verified"], 1, "{pulled}");
    vm.cleanup_also(pulled["import"]["name"].as_str().unwrap());
}

/// Signing appends to the signatures where it writes, even when
/// `registries.conf` sends reads of that name to a mirror first: the mirror's
/// stale copy (one signature behind) must not be what the new one is merged
/// with, or the signature added since would be lost.
#[test]
fn signing_behind_a_stale_mirror_keeps_every_signature_of_the_registry() {
    if !registry_tests_enabled(
        "signing_behind_a_stale_mirror_keeps_every_signature_of_the_registry",
    ) {
        return;
    }
    let primary = TestRegistry::start(RegistryOptions::default());
    let mirror = TestRegistry::start(RegistryOptions::default());
    let work = vm::workdir();
    let home = vm::workdir();
    let h = home.path();
    let keys: Vec<_> = ["first", "second", "third"]
        .iter()
        .map(|name| generate_key(h, name))
        .collect();
    let vm = small_vm(work.path(), "sarde-sig-mirror", 4);
    let image = format!("{}/e2e/mirrored:1", primary.address());
    ok(sarde(h).args(["export", "--chunksize", "1MiB", &vm.name, &image]));
    let (private, _, passphrase) = &keys[0];
    let digest = digest_of(&push_signed(h, private, passphrase, &image));
    // The mirror gets the image with its one signature, and then no more.
    ok(sarde(h).args([
        "copy",
        "--insecure",
        &format!("docker://{image}"),
        &format!("docker://{}/e2e/mirrored:1", mirror.address()),
    ]));
    std::fs::write(
        h.join("registries.conf"),
        format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
            primary.address(),
            mirror.address()
        ),
    )
    .unwrap();
    let layers = |registry: &TestRegistry| {
        let manifest: Value = serde_json::from_str(&registry_get(
            registry,
            &format!("/v2/e2e/mirrored/manifests/{}", sig_tag(&digest)),
            "application/vnd.oci.image.manifest.v1+json",
        ))
        .unwrap();
        manifest["layers"].as_array().unwrap().len()
    };
    for (signers, (private, _, passphrase)) in keys.iter().enumerate().skip(1) {
        let pushed = push_signed(h, private, passphrase, &image);
        assert_eq!(pushed["signed"][0]["signatures"], signers + 1, "{pushed}");
        assert_eq!(layers(&primary), signers + 1, "signatures lost");
    }
    assert_eq!(layers(&mirror), 1, "the mirror was written to");
}

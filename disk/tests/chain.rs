//! Backing chains with real images made by qemu-img.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use sarde_disk::{ChainFile, DiskError, backing_chain, rebase_in_place};

fn create(path: &Path, backing: Option<(&str, &str)>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some((reference, format)) = backing {
        args.extend(["-b", reference, "-F", format]);
    }
    args.push(p(path));
    if backing.is_none() {
        args.push("64M");
    }
    qemu_img(&args);
}

fn canon(path: &Path) -> PathBuf {
    path.canonicalize().unwrap()
}

fn check_file(c: &ChainFile, path: &Path, backing: Option<&Path>, reference: Option<&str>) {
    assert_eq!(c.path, canon(path));
    assert_eq!(c.format, "qcow2");
    assert_eq!(c.virtual_size, 64 << 20);
    assert_eq!(c.file_size, fs::metadata(path).unwrap().len());
    assert_eq!(c.backing, backing.map(canon));
    assert_eq!(c.backing_reference.as_deref(), reference);
}

#[test]
fn single_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("only.qcow2");
    create(&img, None);
    let chain = backing_chain(&img).unwrap();
    assert_eq!(chain.len(), 1);
    check_file(&chain[0], &img, None, None);
    assert!(chain[0].path.is_absolute());
}

#[test]
fn overlay_with_plain_relative_reference() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, None);
    create(&top, Some(("base.qcow2", "qcow2")));
    let chain = backing_chain(&top).unwrap();
    assert_eq!(chain.len(), 2);
    check_file(&chain[0], &base, None, None);
    check_file(&chain[1], &top, Some(&base), Some("base.qcow2"));
}

#[test]
fn overlay_with_dot_slash_reference() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, None);
    create(&top, Some(("./base.qcow2", "qcow2")));
    let chain = backing_chain(&top).unwrap();
    assert_eq!(chain.len(), 2);
    check_file(&chain[0], &base, None, None);
    check_file(&chain[1], &top, Some(&base), Some("./base.qcow2"));
}

#[test]
fn overlay_with_absolute_reference_in_another_directory() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let base = a.path().join("base.qcow2");
    let top = b.path().join("top.qcow2");
    create(&base, None);
    let reference = canon(&base).to_str().unwrap().to_string();
    create(&top, Some((&reference, "qcow2")));
    let chain = backing_chain(&top).unwrap();
    assert_eq!(chain.len(), 2);
    check_file(&chain[0], &base, None, None);
    check_file(&chain[1], &top, Some(&base), Some(&reference));
}

#[test]
fn three_levels_across_two_directories() {
    let root = tempfile::tempdir().unwrap();
    let a = root.path().join("a");
    let b = root.path().join("b");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let base = a.join("base.qcow2");
    let mid = a.join("mid.qcow2");
    let top = b.join("top.qcow2");
    create(&base, None);
    create(&mid, Some(("base.qcow2", "qcow2")));
    create(&top, Some(("../a/mid.qcow2", "qcow2")));
    let chain = backing_chain(&top).unwrap();
    assert_eq!(chain.len(), 3);
    check_file(&chain[0], &base, None, None);
    check_file(&chain[1], &mid, Some(&base), Some("base.qcow2"));
    check_file(&chain[2], &top, Some(&mid), Some("../a/mid.qcow2"));
    // Reached through a symbolic link elsewhere: paths come back canonical, and the
    // relative reference still resolves (against the link's directory, as qemu does).
    let elsewhere = root.path().join("c");
    fs::create_dir_all(&elsewhere).unwrap();
    let link = elsewhere.join("link.qcow2");
    std::os::unix::fs::symlink(&mid, &link).unwrap();
    let base_link = elsewhere.join("base.qcow2");
    std::os::unix::fs::symlink(&base, &base_link).unwrap();
    let chain = backing_chain(&link).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].path, canon(&mid));
    assert_eq!(chain[0].path, canon(&base));
}

#[test]
fn raw_base_is_reported_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", p(&base), "64M"]);
    create(&top, Some(("base.raw", "raw")));
    let chain = backing_chain(&top).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0].format, "raw");
    assert_eq!(chain[0].file_size, 64 << 20);
    assert_eq!(chain[1].format, "qcow2");
}

#[test]
fn loops_are_detected_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    create(&a, None);
    create(&b, Some(("a.qcow2", "qcow2")));
    // qemu-img create refuses loops, but an unsafe rebase writes one.
    rebase_in_place(&a, Some("b.qcow2"), Some("qcow2")).unwrap();
    match backing_chain(&b).unwrap_err() {
        DiskError::BackingLoop { file, backing } => {
            assert_eq!(file, canon(&a));
            assert_eq!(backing, canon(&b));
        }
        other => panic!("unexpected error {other}"),
    }
    // A loop through `./` references: qemu-img itself fails with "File name too long".
    rebase_in_place(&a, Some("./b.qcow2"), Some("qcow2")).unwrap();
    rebase_in_place(&b, Some("./a.qcow2"), Some("qcow2")).unwrap();
    let err = backing_chain(&a).unwrap_err();
    assert!(matches!(err, DiskError::BackingLoop { .. }), "{err}");
    assert!(err.to_string().len() < 1000, "{err}");
    // An image that is its own backing file.
    let own = dir.path().join("own.qcow2");
    create(&own, None);
    rebase_in_place(&own, Some("own.qcow2"), Some("qcow2")).unwrap();
    match backing_chain(&own).unwrap_err() {
        DiskError::BackingLoop { file, backing } => {
            assert_eq!((file, backing), (canon(&own), canon(&own)));
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn missing_backing_file_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, None);
    create(&top, Some(("base.qcow2", "qcow2")));
    fs::remove_file(&base).unwrap();
    match backing_chain(&top).unwrap_err() {
        DiskError::BackingMissing {
            file,
            reference,
            resolved,
            ..
        } => {
            assert_eq!(file, canon(&top));
            assert_eq!(reference, "base.qcow2");
            assert_eq!(resolved.file_name().unwrap(), "base.qcow2");
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn qemu_img_errors_carry_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.qcow2");
    let err = backing_chain(&missing).unwrap_err();
    assert!(matches!(err, DiskError::QemuImg { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("nope.qcow2") && text.contains("No such file"),
        "{text}"
    );
}

#[test]
fn rebase_in_place_changes_only_the_reference() {
    let root = tempfile::tempdir().unwrap();
    let a = root.path().join("a");
    let b = root.path().join("b");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let base = a.join("base.qcow2");
    let top = b.join("top.qcow2");
    create(&base, None);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 0 2M", p(&base)],
    );
    let absolute = canon(&base).to_str().unwrap().to_string();
    create(&top, Some((&absolute, "qcow2")));
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 1M 2M", p(&top)],
    );
    // Keep a copy of the overlay as it was; then move the base next to the overlay
    // and point the overlay at it relatively, as an import does.
    let before = b.join("before.qcow2");
    fs::copy(&top, &before).unwrap();
    fs::copy(&base, b.join("base.qcow2")).unwrap();
    rebase_in_place(&top, Some("./base.qcow2"), Some("qcow2")).unwrap();

    let info = qemu_img(&["info", "--output=json", "-U", p(&top)]);
    assert!(
        info.contains(r#""backing-filename": "./base.qcow2""#),
        "{info}"
    );
    let chain = backing_chain(&top).unwrap();
    assert_eq!(chain[0].path, canon(&b.join("base.qcow2")));
    assert_eq!(chain[1].backing_reference.as_deref(), Some("./base.qcow2"));
    // Same guest content through the old and the new chain.
    assert_eq!(
        status("qemu-img", &["compare", "-U", p(&before), p(&top)]),
        0,
        "guest content changed"
    );
    // Different content is noticed by the same comparison (the test can fail).
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x55 0 64k",
            p(&b.join("base.qcow2")),
        ],
    );
    assert_eq!(
        status("qemu-img", &["compare", "-U", p(&before), p(&top)]),
        1
    );

    // No backing file at all, and a backing file without a format.
    rebase_in_place(&before, None, None).unwrap();
    let chain = backing_chain(&before).unwrap();
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].backing_reference, None);
    let err = rebase_in_place(&top, Some("base.qcow2"), None).unwrap_err();
    assert!(
        matches!(err, DiskError::BackingFormatRequired { .. }),
        "{err}"
    );
    // qemu-img failures name the file and carry stderr.
    let err = rebase_in_place(&root.path().join("absent.qcow2"), None, None).unwrap_err();
    assert!(err.to_string().contains("absent.qcow2"), "{err}");
}

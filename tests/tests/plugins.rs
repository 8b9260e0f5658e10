//! Plugins are built as a third party would build them, loaded through the
//! registry, used, and refused when incompatible.

use std::sync::Arc;

use sarde_api::codec::{decode_exact, encode_to_vec};
use sarde_api::plugin::{self, PluginError};
use sarde_api::registry::Kind;
use sarde_api::{EncodeOptions, Origin, Registrar, Registry};
use sarde_e2e::build_cdylib;

fn registry_with_builtin_zstd() -> Registry {
    let mut registry = Registry::new();
    sarde_codec_zstd::register(&mut registry.registrar(Origin::BuiltIn)).unwrap();
    registry
}

#[test]
fn example_plugin_registers_a_working_codec() {
    let lib = build_cdylib("sarde-plugin-example-lz4", &[]);
    let mut registry = registry_with_builtin_zstd();
    let loaded = plugin::load(&mut registry, &lib).expect("example plugin loads");
    assert_eq!(loaded.name, "example-lz4");
    assert_eq!(loaded.path, lib);

    let entries = registry.entries();
    let lz4 = entries
        .iter()
        .find(|e| e.kind == Kind::Codec && e.name == "lz4")
        .expect("lz4 is listed");
    assert_eq!(lz4.origin, Origin::Plugin(lib.clone()));
    assert!(
        entries
            .iter()
            .any(|e| e.name == "zstd" && e.origin == Origin::BuiltIn)
    );

    // Use it through the registry, by name and by media-type suffix.
    let codec = registry.codec("lz4").unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i / 7 % 256) as u8).collect();
    let packed = encode_to_vec(codec.as_ref(), &data, &EncodeOptions::default()).unwrap();
    assert!(
        packed.len() < data.len() / 4,
        "lz4 compressed to {}",
        packed.len()
    );
    let by_suffix = registry.codec_for_suffix(Some("+lz4")).unwrap();
    let mut out = Vec::new();
    decode_exact(
        by_suffix.as_ref(),
        Box::new(&packed[..]),
        &mut out,
        data.len() as u64,
    )
    .unwrap();
    assert_eq!(out, data);

    // Loading it twice is a clear duplicate error, not a silent override.
    let err = plugin::load(&mut registry, &lib).unwrap_err();
    assert!(matches!(err, PluginError::Register { .. }), "{err}");
    assert!(err.to_string().contains("already registered"), "{err}");
}

#[test]
fn plugin_of_another_abi_version_is_refused_with_both_versions() {
    let lib = build_cdylib("sarde-fixture-incompatible-plugin", &[]);
    let mut registry = registry_with_builtin_zstd();
    let err = plugin::load(&mut registry, &lib).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::AbiVersion { .. }), "{msg}");
    let host = plugin::ABI_VERSION;
    assert!(
        msg.contains(&format!("plugin ABI {}", host + 1000)),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("this sarde uses ABI {host}")),
        "{msg}"
    );
    assert!(msg.contains("incompatible-fixture"), "{msg}");
    // Nothing of it was registered.
    assert_eq!(registry.entries().len(), 1);
}

#[test]
fn plugin_from_another_compiler_is_refused_naming_both_compilers() {
    let lib = build_cdylib("sarde-fixture-incompatible-plugin", &["other-compiler"]);
    let mut registry = Registry::new();
    let err = plugin::load(&mut registry, &lib).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::Compiler { .. }), "{msg}");
    assert!(msg.contains("rustc 0.0.1-fixture"), "{msg}");
    assert!(
        msg.contains(plugin::RUSTC_VERSION.trim_end_matches('\0')),
        "{msg}"
    );
}

#[test]
fn libraries_that_are_not_plugins_are_refused() {
    let dir = std::env::temp_dir().join(format!("sarde-plugin-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("fake.so");
    std::fs::write(&fake, b"not an ELF file").unwrap();
    let mut registry = Registry::new();
    let err = plugin::load(&mut registry, &fake).unwrap_err();
    assert!(matches!(err, PluginError::Load { .. }), "{err}");
    assert!(err.to_string().contains("fake.so"), "{err}");

    // A real shared library without the entry symbol.
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
    .expect("libc is installed");
    let err = plugin::load(&mut registry, &libc).unwrap_err();
    assert!(matches!(err, PluginError::NoEntry { .. }), "{err}");
    assert!(
        err.to_string().contains("sarde_plugin_declaration"),
        "{err}"
    );

    // Discovery lists only shared libraries, sorted; a missing directory is empty.
    std::fs::write(dir.join("a.so"), b"").unwrap();
    std::fs::write(dir.join("notes.txt"), b"").unwrap();
    let found = plugin::discover(&dir).unwrap();
    assert_eq!(found, vec![dir.join("a.so"), dir.join("fake.so")]);
    assert!(plugin::discover(&dir.join("missing")).unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn registrar_refuses_bad_names_and_unknown_lookups_list_alternatives() {
    let mut registry = registry_with_builtin_zstd();
    let err = match registry.codec("zstandard") {
        Err(e) => e.to_string(),
        Ok(_) => panic!("unknown codec resolved"),
    };
    assert!(
        err.contains("unknown codec \"zstandard\"") && err.contains("zstd"),
        "{err}"
    );

    struct Named(&'static str);
    impl sarde_api::Codec for Named {
        fn name(&self) -> &str {
            self.0
        }
        fn media_type_suffix(&self) -> Option<&str> {
            None
        }
        fn levels(&self) -> Option<std::ops::RangeInclusive<i32>> {
            None
        }
        fn default_level(&self) -> Option<i32> {
            None
        }
        fn encoder<'w>(
            &self,
            _: sarde_api::codec::Output<'w>,
            _: &EncodeOptions,
        ) -> Result<Box<dyn sarde_api::Encoder + 'w>, sarde_api::CodecError> {
            unimplemented!("never encoded in this test")
        }
        fn decoder<'r>(
            &self,
            _: sarde_api::codec::Input<'r>,
        ) -> Result<sarde_api::codec::Input<'r>, sarde_api::CodecError> {
            unimplemented!("never decoded in this test")
        }
    }
    let mut r = registry.registrar(Origin::BuiltIn);
    assert!(r.register_codec(Arc::new(Named("Bad Name"))).is_err());
    assert!(r.register_codec(Arc::new(Named("zstd"))).is_err());
    assert!(r.register_codec(Arc::new(Named("my-codec_2"))).is_ok());
}

//! The binary contract between a host and a plugin library, checked before any Rust type crosses.
//!
//! A plugin exports, through [`export_plugin!`](crate::export_plugin), four C-ABI symbols that
//! the host reads in order, and a Rust-ABI `register` function it calls only when all agree:
//!
//! 1. [`SYM_ABI_VERSION`]: [`ABI_VERSION`] as the plugin was compiled;
//! 2. [`SYM_FINGERPRINT`]: the build fingerprint ([`build_fingerprint!`](crate::build_fingerprint)),
//!    `field=value;` pairs, so that a mismatch names its field;
//! 3. [`SYM_TYPE_HASH`]: a hash of the `TypeId`s of the types that cross the boundary;
//! 4. [`SYM_RUNTIME_ANCHOR`]: the address of [`RUNTIME_ANCHOR`] as the plugin sees it. It equals
//!    the host's only when both use the same loaded runtime; a plugin that linked its own copy of
//!    the core (and so of candle) sees its own copy, and would silently lose gradients.
//!
//! Beside the checks, [`SYM_CODE_VERSION`] gives the plugin's code version (a hash of its
//! sources, `distill-build`), which every job's identity includes.
//!
//! Constants and `TypeId`s are evaluated when the *plugin* is compiled (they are expanded into it
//! by the macros), so they record what the plugin was built against.

use std::any::TypeId;
use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicU8;

/// Version of the plugin API; bumped on every change to a type or trait that crosses the boundary.
pub const ABI_VERSION: u32 = 4;

/// The fields of the fingerprint known when the core is compiled (versions, a hash of the core's
/// sources, rustc, target, profile, opt-level, core features, rustflags, Cargo.lock hash),
/// `field=value;` each.
pub const CORE_FINGERPRINT: &str = include_str!(concat!(env!("OUT_DIR"), "/fingerprint.txt"));

/// Symbol: `extern "C" fn() -> u32`, the plugin's [`ABI_VERSION`].
pub const SYM_ABI_VERSION: &[u8] = b"distill_plugin_abi_version";
/// Symbol: `extern "C" fn() -> *const c_char`, the plugin's NUL-terminated build fingerprint.
pub const SYM_FINGERPRINT: &[u8] = b"distill_plugin_fingerprint";
/// Symbol: `extern "C" fn() -> u64`, the plugin's hash of crossing `TypeId`s.
pub const SYM_TYPE_HASH: &[u8] = b"distill_plugin_type_hash";
/// Symbol: `extern "C" fn() -> *const u8`, the address of [`RUNTIME_ANCHOR`] the plugin sees.
pub const SYM_RUNTIME_ANCHOR: &[u8] = b"distill_plugin_runtime_anchor";
/// Symbol: `extern "C" fn() -> *const c_char`, the plugin's NUL-terminated code version: the
/// hash its build script computed (`distill_build::emit_plugin_version`), or empty for a plugin
/// built without one (the host then hashes the library file).
pub const SYM_CODE_VERSION: &[u8] = b"distill_plugin_code_version";
/// Symbol: [`RegisterFn`], called last.
pub const SYM_REGISTER: &[u8] = b"distill_plugin_register";

/// The Rust-ABI registration entry point of a plugin.
pub type RegisterFn = fn(&mut crate::Registrar) -> crate::Result<()>;

/// A static whose address identifies the loaded runtime.
pub static RUNTIME_ANCHOR: AtomicU8 = AtomicU8::new(0);

/// The address of [`RUNTIME_ANCHOR`] in the copy of the core this code was linked with.
pub fn runtime_anchor() -> *const u8 {
    RUNTIME_ANCHOR.as_ptr().cast_const()
}

/// Hashes a list of `TypeId`s with a fixed-key hasher.
pub fn hash_type_ids(ids: &[TypeId]) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x6469_7374, 0x696c_6c65);
    ids.hash(&mut h);
    h.finish()
}

/// The `TypeId`s of the types that cross the boundary, evaluated in the expanding crate.
#[macro_export]
macro_rules! crossing_type_ids {
    () => {
        [
            ::std::any::TypeId::of::<$crate::candle::Tensor>(),
            ::std::any::TypeId::of::<$crate::candle::Var>(),
            ::std::any::TypeId::of::<$crate::candle::Device>(),
            ::std::any::TypeId::of::<$crate::candle::DType>(),
            ::std::any::TypeId::of::<$crate::candle::Error>(),
            ::std::any::TypeId::of::<$crate::candle_nn::VarBuilder<'static>>(),
            ::std::any::TypeId::of::<$crate::candle_nn::VarMap>(),
            ::std::any::TypeId::of::<$crate::Error>(),
            ::std::any::TypeId::of::<$crate::Registrar>(),
            ::std::any::TypeId::of::<$crate::Batch>(),
            ::std::any::TypeId::of::<$crate::ModelOutput>(),
            ::std::any::TypeId::of::<$crate::LossTerms>(),
            ::std::any::TypeId::of::<::std::boxed::Box<dyn $crate::Model>>(),
            ::std::any::TypeId::of::<::std::boxed::Box<dyn $crate::Strategy>>(),
            ::std::any::TypeId::of::<::std::boxed::Box<dyn $crate::Dataset>>(),
            ::std::any::TypeId::of::<$crate::serde_json::Value>(),
        ]
    };
}

/// The full build fingerprint as a `&'static str` ending in NUL: [`CORE_FINGERPRINT`] plus the
/// fields only the expanding crate knows (debug-assertions, panic strategy, target features).
#[macro_export]
macro_rules! build_fingerprint {
    () => {{
        const PARTS: &[&str] = &[
            $crate::abi::CORE_FINGERPRINT,
            "debug-assertions=",
            if cfg!(debug_assertions) { "on" } else { "off" },
            ";panic=",
            if cfg!(panic = "unwind") {
                "unwind"
            } else {
                "abort"
            },
            ";target-features=",
            if cfg!(target_feature = "sse4.2") {
                "+sse4.2"
            } else {
                ""
            },
            if cfg!(target_feature = "avx") {
                "+avx"
            } else {
                ""
            },
            if cfg!(target_feature = "avx2") {
                "+avx2"
            } else {
                ""
            },
            if cfg!(target_feature = "fma") {
                "+fma"
            } else {
                ""
            },
            if cfg!(target_feature = "f16c") {
                "+f16c"
            } else {
                ""
            },
            if cfg!(target_feature = "avx512f") {
                "+avx512f"
            } else {
                ""
            },
            if cfg!(target_feature = "neon") {
                "+neon"
            } else {
                ""
            },
            ";\0",
        ];
        const LEN: usize = $crate::abi::total_len(PARTS);
        const BYTES: [u8; LEN] = $crate::abi::concat_parts(PARTS);
        const TEXT: &str = match ::std::str::from_utf8(&BYTES) {
            Ok(s) => s,
            Err(_) => panic!("fingerprint is not UTF-8"),
        };
        TEXT
    }};
}

/// Total length of `parts` (const helper of [`build_fingerprint!`](crate::build_fingerprint)).
pub const fn total_len(parts: &[&str]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < parts.len() {
        n += parts[i].len();
        i += 1;
    }
    n
}

/// `parts` concatenated (const helper of [`build_fingerprint!`](crate::build_fingerprint)).
pub const fn concat_parts<const N: usize>(parts: &[&str]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut k = 0;
    let mut i = 0;
    while i < parts.len() {
        let bytes = parts[i].as_bytes();
        let mut j = 0;
        while j < bytes.len() {
            out[k] = bytes[j];
            k += 1;
            j += 1;
        }
        i += 1;
    }
    out
}

/// The first field whose value differs between two fingerprints: `(field, left, right)`.
/// A field present on one side only counts as differing (its other value is `<absent>`).
pub fn first_difference(left: &str, right: &str) -> Option<(String, String, String)> {
    let parse = |s: &str| -> Vec<(String, String)> {
        s.trim_end_matches('\0')
            .split(';')
            .filter(|f| !f.is_empty())
            .map(|f| match f.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (f.to_string(), String::new()),
            })
            .collect()
    };
    let (l, r) = (parse(left), parse(right));
    let value = |fields: &[(String, String)], key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "<absent>".into())
    };
    l.iter()
        .chain(r.iter())
        .map(|(k, _)| k)
        .find(|k| value(&l, k) != value(&r, k))
        .map(|k| (k.clone(), value(&l, k), value(&r, k)))
}

/// Exports the plugin entry points. `$register` is a `fn(&mut Registrar) -> Result<()>`.
///
/// ```ignore
/// distill_rt::export_plugin!(register);
/// fn register(r: &mut distill_rt::Registrar) -> distill_rt::Result<()> {
///     r.strategy("my-loss", MyLossFactory)
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($register:path) => {
        /// ABI version this plugin was compiled against.
        #[unsafe(no_mangle)]
        pub extern "C" fn distill_plugin_abi_version() -> u32 {
            $crate::abi::ABI_VERSION
        }

        /// Build fingerprint of this plugin, NUL-terminated.
        #[unsafe(no_mangle)]
        pub extern "C" fn distill_plugin_fingerprint() -> *const ::std::ffi::c_char {
            $crate::build_fingerprint!().as_ptr().cast()
        }

        /// Hash of the `TypeId`s this plugin sees for the crossing types.
        #[unsafe(no_mangle)]
        pub extern "C" fn distill_plugin_type_hash() -> u64 {
            $crate::abi::hash_type_ids(&$crate::crossing_type_ids!())
        }

        /// Address of the runtime anchor this plugin is linked with.
        #[unsafe(no_mangle)]
        pub extern "C" fn distill_plugin_runtime_anchor() -> *const u8 {
            $crate::abi::runtime_anchor()
        }

        /// The code version of this plugin's sources (empty without `distill-build`), NUL-terminated.
        #[unsafe(no_mangle)]
        pub extern "C" fn distill_plugin_code_version() -> *const ::std::ffi::c_char {
            const PARTS: &[&str] = &[
                match ::std::option_env!("DISTILL_PLUGIN_CODE_VERSION") {
                    Some(v) => v,
                    None => "",
                },
                "\0",
            ];
            const LEN: usize = $crate::abi::total_len(PARTS);
            static BYTES: [u8; LEN] = $crate::abi::concat_parts(PARTS);
            BYTES.as_ptr().cast()
        }

        /// Registers this plugin's factories; a panic becomes an error.
        #[unsafe(no_mangle)]
        pub fn distill_plugin_register(registrar: &mut $crate::Registrar) -> $crate::Result<()> {
            $crate::contain("register", || $register(registrar))
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_has_every_field_and_ends_in_nul() {
        let fp = crate::build_fingerprint!();
        assert!(fp.ends_with(";\0"));
        for field in [
            "core",
            "candle-core",
            "candle-nn",
            "tracing",
            "rustc",
            "rustc-commit",
            "target",
            "profile",
            "opt-level",
            "core-features",
            "rustflags",
            "cargo-lock",
            "debug-assertions",
            "panic",
            "target-features",
        ] {
            assert!(
                fp.contains(&format!("{field}=")),
                "{field} missing from {fp}"
            );
        }
        assert!(!fp.contains("candle-core=unlocked"), "{fp}");
    }

    #[test]
    fn first_difference_names_the_field() {
        let a = "core=0.1.0;debug-assertions=on;panic=unwind;\0";
        let b = "core=0.1.0;debug-assertions=off;panic=unwind;\0";
        assert_eq!(
            first_difference(a, b),
            Some(("debug-assertions".into(), "on".into(), "off".into()))
        );
        assert_eq!(first_difference(a, a), None);
        assert_eq!(
            first_difference("a=1;", "a=1;b=2;"),
            Some(("b".into(), "<absent>".into(), "2".into()))
        );
    }
}

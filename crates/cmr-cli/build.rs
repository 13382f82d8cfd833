//! Embeds the shipped models (`models/<name>/`, a run or a cross-validation
//! folder) in the binary, so that `--model <name>` works wherever `cmr` is
//! installed: `$OUT_DIR/embedded_models.rs` lists every file of every model
//! with `include_bytes!`, and a content hash per model names its cache folder.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Every file under `dir`, relative paths, sorted.
fn files(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files(&path, base, out);
        } else if let Ok(rel) = path.strip_prefix(base) {
            out.push(rel.to_path_buf());
        }
    }
}

/// FNV-1a over the files' names and bytes.
fn hash(root: &Path, rel: &[PathBuf]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for r in rel {
        let bytes = std::fs::read(root.join(r)).unwrap_or_default();
        for b in r.to_string_lossy().bytes().chain(bytes) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let models = manifest.join("../../models");
    println!("cargo:rerun-if-changed={}", models.display());
    let mut code = String::from(
        "/// (name, content hash, [(relative path, bytes)]) of each shipped model.\npub static EMBEDDED: &[EmbeddedModel] = &[\n",
    );
    let mut names: Vec<PathBuf> = std::fs::read_dir(&models)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for dir in names {
        if !(dir.join("model.safetensors").is_file() || dir.join("cv.json").is_file()) {
            continue;
        }
        let name = dir
            .file_name()
            .expect("a folder has a name")
            .to_string_lossy()
            .into_owned();
        let mut rel = Vec::new();
        files(&dir, &dir, &mut rel);
        let _ = writeln!(code, "    ({name:?}, \"{:016x}\", &[", hash(&dir, &rel));
        for r in &rel {
            let abs = dir.join(r).canonicalize().expect("a listed file exists");
            let _ = writeln!(
                code,
                "        ({:?}, include_bytes!({:?})),",
                r.to_string_lossy().replace('\\', "/"),
                abs.to_string_lossy()
            );
        }
        code.push_str("    ]),\n");
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("embedded_models.rs");
    std::fs::write(&out, code).expect("writing embedded_models.rs");
}

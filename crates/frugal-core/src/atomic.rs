//! Atomic writes: a file or folder is written under a temporary name, then renamed into place,
//! so that an interrupted write never leaves a half-written file where a complete one was.

use crate::{Error, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A sibling temporary path of `path`: same folder, so that the rename stays on one file system.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| {
        let mut f = fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))?;
        f.sync_all().map_err(|e| Error::io(tmp, e))
    })
}

/// Runs `fill` on a temporary path beside `path`, then renames it to `path`. On error the
/// temporary file is removed and `path` is left as it was.
pub fn write_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    match fill(&tmp) {
        Ok(()) => fs::rename(&tmp, path).map_err(|e| Error::io(path, e)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Builds the folder `dir` atomically: `fill` writes into a temporary folder beside it, which is
/// then renamed to `dir` (replacing an older `dir`). On error nothing of the new folder remains.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(dir);
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    if let Some(parent) = dir.parent() {
        // Make the rename durable; failure here is not worth an error.
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write(&p, b"old").unwrap();
        let r = write_with(&p, |tmp| {
            fs::write(tmp, b"half").unwrap();
            Err(Error::Msg("disk full".into()))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temporary file left behind"
        );
    }

    #[test]
    fn failed_dir_write_keeps_the_old_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ck");
        write_dir(&d, |t| write(&t.join("x"), b"1")).unwrap();
        let r = write_dir(&d, |t| {
            write(&t.join("x"), b"2")?;
            Err(Error::Msg("interrupted".into()))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(d.join("x")).unwrap(), b"1");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

//! MovieLens rating files: `ratings.csv` (ml-latest-small, ml-25m: header
//! `userId,movieId,rating,timestamp`), `u.data` (ml-100k: tab-separated, no header) and
//! `ratings.dat` (ml-1m: `::`-separated, no header). A bad line is an error naming the file and
//! its 1-based line number.

use std::path::Path;

use distill_rt::serde::Deserialize;
use distill_rt::{Error, Result};

/// One rating as the file gives it (raw ids).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rating {
    /// Raw user id.
    pub user: u64,
    /// Raw item id.
    pub item: u64,
    /// The rating (stars).
    pub rating: f32,
    /// Seconds since the epoch.
    pub timestamp: i64,
}

/// Which MovieLens file layout to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", rename_all = "kebab-case")]
pub enum Format {
    /// `ratings.csv`: comma-separated with a header line.
    Csv,
    /// `u.data`: tab-separated, no header.
    Tab,
    /// `ratings.dat`: `::`-separated, no header.
    Dat,
}

impl Format {
    /// The layout a MovieLens file of this name has: `*.dat` `::`, `u.data` tab, else CSV.
    pub fn from_file_name(path: &Path) -> Format {
        match path.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.ends_with(".dat") => Format::Dat,
            Some("u.data") => Format::Tab,
            _ => Format::Csv,
        }
    }

    fn separator(self) -> &'static str {
        match self {
            Format::Csv => ",",
            Format::Tab => "\t",
            Format::Dat => "::",
        }
    }
}

/// Reads every rating of `path` in `format`.
pub fn read_ratings(path: &Path, format: Format) -> Result<Vec<Rating>> {
    let bytes = std::fs::read(path).map_err(|e| Error::data(path, format!("cannot read: {e}")))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        Error::data(path, format!("line {line}: not valid UTF-8"))
    })?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    if format == Format::Csv {
        match lines.next() {
            Some((_, header)) if header.trim() == "userId,movieId,rating,timestamp" => {}
            Some((_, header)) => {
                return Err(Error::data(
                    path,
                    format!(
                        "line 1: expected the header `userId,movieId,rating,timestamp`, found `{header}`"
                    ),
                ));
            }
            None => return Err(Error::data(path, "the file is empty")),
        }
    }
    let sep = format.separator();
    let ratings: Vec<Rating> = lines
        .map(|(i, line)| {
            let n = i + 1;
            let fields: Vec<&str> = line.trim().split(sep).collect();
            if fields.len() != 4 {
                return Err(Error::data(
                    path,
                    format!(
                        "line {n}: {} fields, expected 4 (user, item, rating, timestamp)",
                        fields.len()
                    ),
                ));
            }
            let bad = |what: &str, v: &str| {
                Error::data(path, format!("line {n}: {what} `{v}` is not a number"))
            };
            // `inf`, `NaN` and values beyond f32's range parse; a rating must be finite.
            let rating: f32 = fields[2].parse().map_err(|_| bad("rating", fields[2]))?;
            if !rating.is_finite() {
                return Err(Error::data(
                    path,
                    format!("line {n}: rating `{}` is not a finite number", fields[2]),
                ));
            }
            Ok(Rating {
                user: fields[0].parse().map_err(|_| bad("user id", fields[0]))?,
                item: fields[1].parse().map_err(|_| bad("item id", fields[1]))?,
                rating,
                timestamp: fields[3].parse().map_err(|_| bad("timestamp", fields[3]))?,
            })
        })
        .collect::<Result<_>>()?;
    if ratings.is_empty() {
        return Err(Error::data(path, "the file holds no ratings"));
    }
    Ok(ratings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("distill-recsys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let p = dir.join(name);
        std::fs::write(&p, bytes).ok();
        p
    }

    /// Every input kept in `fuzz/regressions/movielens/` (a crash of the `movielens` fuzz
    /// target, fixed), read in the format its first byte picks: none may panic, and an accepted
    /// file holds only finite ratings.
    #[test]
    fn fuzz_regressions_read_or_fail_cleanly() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/movielens");
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::data(&dir, e.to_string()))?;
        let mut replayed = 0;
        for entry in entries.flatten() {
            let input = std::fs::read(entry.path()).unwrap_or_default();
            let Some((&pick, file)) = input.split_first() else {
                continue;
            };
            let format = [Format::Csv, Format::Tab, Format::Dat][usize::from(pick % 3)];
            if let Ok(rows) = read_ratings(&temp_file("regression", file), format) {
                assert!(rows.iter().all(|r| r.rating.is_finite()));
            }
            replayed += 1;
        }
        assert!(replayed >= 1, "no inputs in {}", dir.display());
        Ok(())
    }

    #[test]
    fn ratings_that_are_not_finite_are_refused_naming_the_line() {
        for (name, text) in [
            ("overflow.dat", "1::1::5::1\n1::2::-1e99::2\n"),
            ("nan.dat", "1::1::5::1\n1::2::NaN::2\n"),
            ("inf.dat", "1::1::5::1\n1::2::inf::2\n"),
        ] {
            let e = read_ratings(&temp_file(name, text.as_bytes()), Format::Dat)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("line 2") && e.contains("not a finite number"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn ml_latest_small_has_its_published_counts() -> Result<()> {
        let path = distill_host::data_folder("ml-latest-small")?.join("ratings.csv");
        let r = read_ratings(&path, Format::Csv)?;
        assert_eq!(r.len(), 100_836);
        let mut users: Vec<u64> = r.iter().map(|x| x.user).collect();
        users.sort();
        users.dedup();
        assert_eq!(users.len(), 610);
        Ok(())
    }

    #[test]
    fn the_three_layouts_read_the_same_ratings() -> Result<()> {
        let want = Rating {
            user: 7,
            item: 42,
            rating: 3.5,
            timestamp: 881250949,
        };
        for (name, bytes, format) in [
            (
                "a.csv",
                &b"userId,movieId,rating,timestamp\n7,42,3.5,881250949\n"[..],
                Format::Csv,
            ),
            ("u.data", &b"7\t42\t3.5\t881250949\n"[..], Format::Tab),
            ("ratings.dat", &b"7::42::3.5::881250949\n"[..], Format::Dat),
        ] {
            assert_eq!(
                read_ratings(&temp_file(name, bytes), format)?,
                [want],
                "{name}"
            );
        }
        Ok(())
    }

    #[test]
    fn malformed_files_name_the_file_and_line() {
        let cases: [(&str, &[u8], &str); 4] = [
            (
                "cols.csv",
                b"userId,movieId,rating,timestamp\n1,2,3\n",
                "line 2: 3 fields, expected 4",
            ),
            (
                "rating.csv",
                b"userId,movieId,rating,timestamp\n1,2,3,4\n1,2,five,4\n",
                "line 3: rating `five` is not a number",
            ),
            ("empty.csv", b"", "empty"),
            (
                "header.csv",
                b"user,item\n1,2,3,4\n",
                "line 1: expected the header",
            ),
        ];
        for (name, bytes, want) in cases {
            let m = match read_ratings(&temp_file(name, bytes), Format::Csv) {
                Ok(r) => panic!("{name}: read {r:?}"),
                Err(e) => e.to_string(),
            };
            assert!(m.contains(want) && m.contains(name), "{name}: {m}");
        }
    }
}

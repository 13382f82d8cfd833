//! The competition's run-length encoding and submission CSV.
//!
//! For each test image and each foreground class `c` in 1, 2, 3 there is one
//! row `<name><c>,<encoding>`, where `<name>` is the mask's file stem
//! (`cmr121_mask`). The class's binary mask is flattened column-major
//! (transpose, then row-major) and each run of ones is written as
//! `start length`, `start` 1-based, all separated by single spaces. An empty
//! mask has an empty encoding.

use std::collections::BTreeMap;
use std::path::Path;

use crate::atomic::write_atomic_with;
use crate::error::{DataError, Result};
use crate::plane::{Mask, Plane, Size};

/// The foreground classes written to a submission.
pub const FOREGROUND: [u8; 3] = [1, 2, 3];

/// Run-length encode the pixels of `mask` equal to `class`, column-major.
pub fn rle_encode(mask: &Mask, class: u8) -> String {
    let (h, w) = (mask.height(), mask.width());
    let mut out = String::new();
    let mut run_start: Option<usize> = None;
    let push = |out: &mut String, start: usize, len: usize| {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("{} {}", start + 1, len));
    };
    for x in 0..w {
        for y in 0..h {
            let i = x * h + y;
            let on = mask.get(y, x) == class;
            match (on, run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(s)) => {
                    push(&mut out, s, i - s);
                    run_start = None;
                }
                _ => {}
            }
        }
    }
    if let Some(s) = run_start {
        push(&mut out, s, h * w - s);
    }
    out
}

/// Decode a run-length string into a binary plane of `size` (true where set).
///
/// Errors on a malformed number, an odd count, a zero start or length, runs out
/// of order or overlapping, or a run past the end of the mask.
pub fn rle_decode(encoding: &str, size: Size) -> Result<Plane<bool>> {
    let (h, w) = (size.height, size.width);
    let mut plane = Plane::zeros(h, w);
    let numbers = encoding
        .split_whitespace()
        .map(|t| {
            t.parse::<usize>()
                .map_err(|_| DataError::Rle(format!("{t:?} is not a non-negative integer")))
        })
        .collect::<Result<Vec<_>>>()?;
    if numbers.len() % 2 != 0 {
        return Err(DataError::Rle(format!(
            "{} numbers: starts and lengths must come in pairs",
            numbers.len()
        )));
    }
    let mut end = 0usize;
    for pair in numbers.chunks(2) {
        let (start, len) = (pair[0], pair[1]);
        if start == 0 || len == 0 {
            return Err(DataError::Rle(format!(
                "run {start} {len}: start and length must be at least 1"
            )));
        }
        let s = start - 1;
        if s < end {
            return Err(DataError::Rle(format!(
                "run {start} {len} overlaps or precedes the previous run"
            )));
        }
        if s + len > h * w {
            return Err(DataError::Rle(format!(
                "run {start} {len} ends past the {}x{} mask",
                w, h
            )));
        }
        for i in s..s + len {
            let (x, y) = (i / h, i % h);
            plane.set(y, x, true);
        }
        end = s + len;
    }
    Ok(plane)
}

/// One submission row: `(id, encoding)`.
pub type Row = (String, String);

/// The three rows of one mask named `name` (its file stem, e.g. `cmr121_mask`).
pub fn submission_rows(name: &str, mask: &Mask) -> [Row; 3] {
    FOREGROUND.map(|c| (format!("{name}{c}"), rle_encode(mask, c)))
}

/// Write the competition CSV for `masks` (file stem, mask) atomically, in the
/// order given.
pub fn write_submission(path: &Path, masks: &[(String, Mask)]) -> Result<()> {
    write_atomic_with(path, |w| {
        writeln!(w, "id,encoding")?;
        for (name, mask) in masks {
            for (id, enc) in submission_rows(name, mask) {
                writeln!(w, "{id},{enc}")?;
            }
        }
        Ok(())
    })
}

/// Write a competition CSV of rows already encoded (see [`submission_rows`]),
/// atomically: a caller that encodes each mask as it is made holds only the
/// run lengths, not every mask.
pub fn write_rows(path: &Path, rows: &[Row]) -> Result<()> {
    write_atomic_with(path, |w| {
        writeln!(w, "id,encoding")?;
        for (id, enc) in rows {
            writeln!(w, "{id},{enc}")?;
        }
        Ok(())
    })
}

/// Read a submission CSV back into masks of `size`, keyed by name (the id
/// without its class digit), in file order.
///
/// Errors name the line: a wrong header, a row without a comma, an id that does
/// not end in 1, 2 or 3, a bad encoding, a pixel claimed by two classes, a
/// repeated row.
pub fn read_submission(path: &Path, size: Size) -> Result<Vec<(String, Mask)>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let csv_err = |line: usize, message: String| DataError::Csv {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.trim() == "id,encoding" => {}
        Some((_, header)) => return Err(csv_err(1, format!("header is {header:?}, expected \"id,encoding\""))),
        None => return Err(csv_err(1, "empty file".into())),
    }
    let mut order: Vec<String> = Vec::new();
    let mut masks: BTreeMap<String, (Mask, [bool; 3])> = BTreeMap::new();
    for (i, line) in lines {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let Some((id, enc)) = line.split_once(',') else {
            return Err(csv_err(n, "expected two fields, id and encoding".into()));
        };
        let id = id.trim().trim_matches('"');
        let enc = enc.trim().trim_matches('"');
        let Some(class) = id
            .chars()
            .last()
            .and_then(|c| c.to_digit(10))
            .filter(|c| (1..=3).contains(c))
        else {
            return Err(csv_err(n, format!("id {id:?} does not end in a class 1, 2 or 3")));
        };
        let name = &id[..id.len() - 1];
        let bits = rle_decode(enc, size).map_err(|e| csv_err(n, e.to_string()))?;
        let entry = masks.entry(name.to_string()).or_insert_with(|| {
            order.push(name.to_string());
            (Plane::zeros(size.height, size.width), [false; 3])
        });
        let seen = &mut entry.1[class as usize - 1];
        if *seen {
            return Err(csv_err(n, format!("row {id:?} appears twice")));
        }
        *seen = true;
        for (m, &b) in entry.0.data_mut().iter_mut().zip(bits.data()) {
            if b {
                if *m != 0 {
                    return Err(csv_err(n, format!("{id}: a pixel is already class {}", *m)));
                }
                *m = class as u8;
            }
        }
    }
    Ok(order
        .into_iter()
        .map(|name| {
            let mask = masks
                .remove(&name)
                .map(|(m, _)| m)
                .unwrap_or_else(|| Plane::zeros(size.height, size.width));
            (name, mask)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size4() -> Size {
        Size { height: 4, width: 4 }
    }

    /// A 4×4 mask, by hand:
    /// ```text
    /// row 0: 0 1 1 0
    /// row 1: 0 1 0 0
    /// row 2: 2 2 0 3
    /// row 3: 0 0 0 3
    /// ```
    fn hand_mask() -> Mask {
        #[rustfmt::skip]
        let data = vec![
            0, 1, 1, 0,
            0, 1, 0, 0,
            2, 2, 0, 3,
            0, 0, 0, 3,
        ];
        Plane::from_vec(4, 4, data).unwrap()
    }

    #[test]
    fn hand_computed_encoding() {
        // Column-major indices (1-based): column 0 is 1..4, column 1 is 5..8 …
        // class 1: (r0,c1)=5, (r1,c1)=6, (r0,c2)=9  → "5 2 9 1"
        // class 2: (r2,c0)=3, (r2,c1)=7             → "3 1 7 1"
        // class 3: (r2,c3)=15, (r3,c3)=16           → "15 2"
        let m = hand_mask();
        assert_eq!(rle_encode(&m, 1), "5 2 9 1");
        assert_eq!(rle_encode(&m, 2), "3 1 7 1");
        assert_eq!(rle_encode(&m, 3), "15 2");
        assert_eq!(rle_encode(&Plane::zeros(4, 4), 1), "");
        assert_eq!(rle_encode(&Plane::from_vec(2, 2, vec![1u8; 4]).unwrap(), 1), "1 4");
    }

    #[test]
    fn hand_computed_decoding() {
        let d = rle_decode("5 2 9 1", size4()).unwrap();
        let on: Vec<(usize, usize)> = (0..4)
            .flat_map(|y| (0..4).map(move |x| (y, x)))
            .filter(|&(y, x)| d.get(y, x))
            .collect();
        assert_eq!(on, vec![(0, 1), (0, 2), (1, 1)]);
        assert!(rle_decode("", size4()).unwrap().data().iter().all(|b| !b));
    }

    #[test]
    fn bad_encodings_are_rejected() {
        for bad in ["1", "0 2", "3 0", "1 17", "5 2 5 1", "x 1", "-1 2"] {
            assert!(rle_decode(bad, size4()).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        let masks = vec![
            ("cmr121_mask".to_string(), hand_mask()),
            ("cmr2_mask".to_string(), Plane::zeros(4, 4)),
        ];
        write_submission(&path, &masks).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "id,encoding\ncmr121_mask1,5 2 9 1\ncmr121_mask2,3 1 7 1\ncmr121_mask3,15 2\n\
             cmr2_mask1,\ncmr2_mask2,\ncmr2_mask3,\n"
        );
        assert_eq!(read_submission(&path, size4()).unwrap(), masks);
        // rows encoded one mask at a time write the same file
        let rows: Vec<Row> = masks.iter().flat_map(|(n, m)| submission_rows(n, m)).collect();
        let other = dir.path().join("r.csv");
        write_rows(&other, &rows).unwrap();
        assert_eq!(std::fs::read_to_string(&other).unwrap(), text);

        std::fs::write(&path, "id,encoding\ncmr1_mask1,1 2\ncmr1_mask2,2 1\n").unwrap();
        let err = read_submission(&path, size4()).unwrap_err().to_string();
        assert!(err.contains(":3:") && err.contains("already class 1"), "{err}");
        std::fs::write(&path, "name,rle\n").unwrap();
        assert!(read_submission(&path, size4()).is_err());
        std::fs::write(&path, "id,encoding\ncmr1_mask4,1 2\n").unwrap();
        assert!(read_submission(&path, size4()).is_err());
    }
}

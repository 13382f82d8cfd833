//! Connected components of a class in a label map (8-connectivity).

/// Label the 8-connected components of the pixels equal to `class` in the
/// row-major `height × width` map. Returns a label per pixel (0 outside the
/// class, 1.. inside) and the size of each component (index `k − 1` for
/// label `k`).
pub fn label_components(labels: &[u8], height: usize, width: usize, class: u8) -> (Vec<u32>, Vec<usize>) {
    let mut comp = vec![0u32; labels.len()];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..labels.len() {
        if labels[start] != class || comp[start] != 0 {
            continue;
        }
        let id = sizes.len() as u32 + 1;
        let mut size = 0;
        comp[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            size += 1;
            let (y, x) = (i / width, i % width);
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let (ny, nx) = (y as isize + dy, x as isize + dx);
                    if ny < 0 || nx < 0 || ny >= height as isize || nx >= width as isize {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if labels[j] == class && comp[j] == 0 {
                        comp[j] = id;
                        stack.push(j);
                    }
                }
            }
        }
        sizes.push(size);
    }
    (comp, sizes)
}

/// The "noise number" of a class: its connected components beyond the
/// largest one (0 when the class has at most one component).
pub fn extra_components(labels: &[u8], height: usize, width: usize, class: u8) -> usize {
    label_components(labels, height, width, class).1.len().saturating_sub(1)
}

/// Keep only the largest 8-connected component of each class in `classes`;
/// pixels of smaller components become background (0). Ties keep the
/// component found first in row-major order.
pub fn keep_largest_components(labels: &mut [u8], height: usize, width: usize, classes: &[u8]) {
    for &class in classes {
        let (comp, sizes) = label_components(labels, height, width, class);
        if sizes.len() <= 1 {
            continue;
        }
        let mut best = 0;
        for (k, &s) in sizes.iter().enumerate() {
            if s > sizes[best] {
                best = k;
            }
        }
        let keep = best as u32 + 1;
        for (l, &c) in labels.iter_mut().zip(&comp) {
            if c != 0 && c != keep {
                *l = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rustfmt::skip]
    const MAP: [u8; 25] = [
        1, 1, 0, 0, 1,
        0, 0, 0, 1, 0,
        0, 2, 0, 0, 0,
        0, 0, 0, 1, 1,
        1, 0, 0, 1, 0,
    ];

    #[test]
    fn diagonal_neighbours_connect() {
        // class 1: {(0,0),(0,1)}, {(0,4),(1,3)} joined diagonally, {(3,3),(3,4),(4,3)}, {(4,0)}
        let (_, sizes) = label_components(&MAP, 5, 5, 1);
        assert_eq!(sizes, vec![2, 2, 3, 1]);
        assert_eq!(extra_components(&MAP, 5, 5, 1), 3);
        assert_eq!(extra_components(&MAP, 5, 5, 2), 0);
        assert_eq!(extra_components(&MAP, 5, 5, 3), 0);
    }

    #[test]
    fn keep_largest_removes_the_rest() {
        let mut m = MAP;
        keep_largest_components(&mut m, 5, 5, &[1, 2, 3]);
        let ones: Vec<usize> = (0..25).filter(|&i| m[i] == 1).collect();
        assert_eq!(ones, vec![18, 19, 23]);
        assert_eq!(m[11], 2);
    }

    #[test]
    fn ties_keep_the_first_component() {
        let mut m = [1u8, 0, 1];
        keep_largest_components(&mut m, 1, 3, &[1]);
        assert_eq!(m, [1, 0, 0]);
    }
}

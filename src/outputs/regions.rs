//! Connected regions of binary masks (8-connectivity), as used by the per-region metrics.
//!
//! `label` gives what `scipy.ndimage.label(mask, structure=np.ones((3, 3)))` gives: labels
//! `1..=n` numbered in raster order of each region's first pixel, 0 for background. It is a
//! flood fill with an explicit stack (no recursion), linear in the number of pixels.

use ndarray::{Array2, ArrayView2};
use serde::Serialize;

/// One connected region: its bounding box in pixels (`x` = column, `y` = row of the top-left
/// corner) and its pixel count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub area: u64,
}

/// Labels the 8-connected regions of `mask`: returns the label image (0 = background, regions
/// `1..=n` in raster order of their first pixel, as SciPy numbers them) and `n`.
///
/// Memory: the label image (4 bytes a pixel) plus a stack of at most one entry (8 bytes) per
/// foreground pixel.
pub fn label(mask: ArrayView2<bool>) -> (Array2<u32>, usize) {
    let (h, w) = mask.dim();
    let mut labels = Array2::<u32>::zeros((h, w));
    let mut n: usize = 0;
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for r in 0..h {
        for c in 0..w {
            if !mask[[r, c]] || labels[[r, c]] != 0 {
                continue;
            }
            n += 1;
            let id = u32::try_from(n).expect("fewer than 2^32 regions");
            labels[[r, c]] = id;
            stack.push((r, c));
            while let Some((pr, pc)) = stack.pop() {
                for nr in pr.saturating_sub(1)..=(pr + 1).min(h - 1) {
                    for nc in pc.saturating_sub(1)..=(pc + 1).min(w - 1) {
                        if mask[[nr, nc]] && labels[[nr, nc]] == 0 {
                            labels[[nr, nc]] = id;
                            stack.push((nr, nc));
                        }
                    }
                }
            }
        }
    }
    (labels, n)
}

/// The 8-connected regions of `mask`, in label order (raster order of their first pixel).
pub fn regions(mask: ArrayView2<bool>) -> Vec<Region> {
    let (labels, n) = label(mask);
    // (min row, min col, max row, max col, area) per region.
    let mut acc = vec![(u32::MAX, u32::MAX, 0u32, 0u32, 0u64); n];
    for ((r, c), &l) in labels.indexed_iter() {
        if l == 0 {
            continue;
        }
        let (r, c) = (r as u32, c as u32);
        let a = &mut acc[l as usize - 1];
        a.0 = a.0.min(r);
        a.1 = a.1.min(c);
        a.2 = a.2.max(r);
        a.3 = a.3.max(c);
        a.4 += 1;
    }
    acc.into_iter()
        .map(|(r0, c0, r1, c1, area)| Region {
            x: c0,
            y: r0,
            width: c1 - c0 + 1,
            height: r1 - r0 + 1,
            area,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr2, Array2};

    fn mask(rows: &[&str]) -> Array2<bool> {
        let h = rows.len();
        let w = rows[0].len();
        Array2::from_shape_fn((h, w), |(r, c)| rows[r].as_bytes()[c] == b'#')
    }

    #[test]
    fn diagonal_touching_is_one_region() {
        let m = mask(&["#..", ".#.", "..#", ".#."]);
        let (l, n) = label(m.view());
        assert_eq!(n, 1);
        assert_eq!(l, arr2(&[[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]]));
        assert_eq!(
            regions(m.view()),
            vec![Region {
                x: 0,
                y: 0,
                width: 3,
                height: 4,
                area: 4
            }]
        );
        // Anti-diagonal as well.
        let m = mask(&["..#", ".#.", "#.."]);
        assert_eq!(label(m.view()).1, 1);
    }

    #[test]
    fn raster_order_of_first_pixel() {
        // The region whose first pixel comes first in raster order gets label 1, even if
        // another region reaches further up-left later in its extent.
        let m = mask(&["...#", "#..#", "#.##", "##.."]);
        let (l, n) = label(m.view());
        assert_eq!(n, 1); // (2,2)-(3,1) touch diagonally
        let m = mask(&["..#.", "....", "#...", "#.##"]);
        let (l2, n2) = label(m.view());
        assert_eq!(n2, 3);
        assert_eq!(
            l2,
            arr2(&[[0, 0, 1, 0], [0, 0, 0, 0], [2, 0, 0, 0], [2, 0, 3, 3]])
        );
        assert_eq!(l[[0, 3]], 1);
    }

    #[test]
    fn ring_with_hole() {
        let m = mask(&["#####", "#...#", "#.#.#", "#...#", "#####"]);
        let (l, n) = label(m.view());
        assert_eq!(n, 2);
        assert_eq!(l[[2, 2]], 2);
        assert_eq!(l[[2, 1]], 0);
        let r = regions(m.view());
        assert_eq!(
            r,
            vec![
                Region {
                    x: 0,
                    y: 0,
                    width: 5,
                    height: 5,
                    area: 16
                },
                Region {
                    x: 2,
                    y: 2,
                    width: 1,
                    height: 1,
                    area: 1
                }
            ]
        );
    }

    #[test]
    fn empty_full_and_single_pixels() {
        let empty = Array2::<bool>::from_elem((3, 4), false);
        let (l, n) = label(empty.view());
        assert_eq!(n, 0);
        assert!(l.iter().all(|&v| v == 0));
        assert!(regions(empty.view()).is_empty());

        let full = Array2::<bool>::from_elem((3, 4), true);
        let (l, n) = label(full.view());
        assert_eq!(n, 1);
        assert!(l.iter().all(|&v| v == 1));
        assert_eq!(
            regions(full.view()),
            vec![Region {
                x: 0,
                y: 0,
                width: 4,
                height: 3,
                area: 12
            }]
        );

        let singles = mask(&["#.#.#", ".....", "#.#.#"]);
        let r = regions(singles.view());
        assert_eq!(r.len(), 6);
        assert!(r
            .iter()
            .all(|g| g.area == 1 && g.width == 1 && g.height == 1));
        assert_eq!((r[3].x, r[3].y), (0, 2));

        let zero = Array2::<bool>::from_elem((0, 5), false);
        assert_eq!(label(zero.view()).1, 0);
        let one = Array2::<bool>::from_elem((1, 1), true);
        assert_eq!(label(one.view()).1, 1);
    }

    #[test]
    fn large_snake_needs_no_recursion() {
        // A one-pixel-wide serpentine through a 1000x1000 mask: one region of ~500k pixels.
        let n = 1000;
        let m = Array2::from_shape_fn((n, n), |(r, c)| {
            r % 2 == 0 || (r % 4 == 1 && c == n - 1) || (r % 4 == 3 && c == 0)
        });
        let r = regions(m.view());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].area, m.iter().filter(|&&v| v).count() as u64);
        assert_eq!((r[0].width, r[0].height), (n as u32, n as u32));
    }

    #[test]
    fn non_standard_layout_view() {
        // A transposed view labels the transposed mask.
        let m = mask(&["##.", "...", "..#"]);
        let t = m.t();
        let (l, n) = label(t);
        assert_eq!(n, 2);
        assert_eq!(l, arr2(&[[1, 0, 0], [1, 0, 0], [0, 0, 2]]));
    }
}

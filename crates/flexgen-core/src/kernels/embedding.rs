//! Embedding-table gather.

use rayon::prelude::*;

use super::PAR_MIN_ELEMS;
use crate::error::{check_len, checked_product, Error, Result};
use crate::matrix::Matrix;
use crate::panel_matrix::PanelMatrix;

const OP: &str = "embedding";

/// Gathers rows of `table` (`vocab x dim`) converted to `f32`: `out[i, :] = table[ids[i], :]`.
///
/// `out` has length `ids.len() * table.cols()`. Returns [`Error::IndexOutOfRange`] for an id
/// `>= table.rows()` (checked before anything is written).
pub fn embedding(table: &Matrix, ids: &[u32], out: &mut [f32]) -> Result<()> {
    check_args(table, ids, out)?;
    let dim = table.cols();
    if dim == 0 || ids.is_empty() {
        return Ok(());
    }
    let gather = |(o, &id): (&mut [f32], &u32)| {
        // Cannot fail: ids and lengths were checked above.
        let _ = table.row_to_f32(id as usize, o);
    };
    if out.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(gather);
    } else {
        out.chunks_mut(dim).zip(ids.iter()).for_each(gather);
    }
    Ok(())
}

fn check_args(table: &Matrix, ids: &[u32], out: &[f32]) -> Result<()> {
    check_dims(table.rows(), table.cols(), ids, out)
}

fn check_dims(rows: usize, cols: usize, ids: &[u32], out: &[f32]) -> Result<()> {
    let expected = checked_product(OP, &[ids.len(), cols])?;
    check_len(OP, "out (ids.len() * cols)", out.len(), expected)?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
        return Err(Error::IndexOutOfRange {
            op: OP,
            index: bad as usize,
            len: rows,
        });
    }
    Ok(())
}

/// [`embedding`] from a prepacked table (e.g. a tied embedding that is also an output
/// projection); same arguments and errors.
pub fn embedding_prepacked(table: &PanelMatrix, ids: &[u32], out: &mut [f32]) -> Result<()> {
    check_dims(table.rows(), table.cols(), ids, out)?;
    let dim = table.cols();
    if dim == 0 || ids.is_empty() {
        return Ok(());
    }
    let gather = |(o, &id): (&mut [f32], &u32)| {
        // Cannot fail: ids and lengths were checked above.
        let _ = table.row_to_f32(id as usize, o);
    };
    if out.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(gather);
    } else {
        out.chunks_mut(dim).zip(ids.iter()).for_each(gather);
    }
    Ok(())
}

/// Scalar reference for [`embedding`] (same arguments and errors).
pub fn embedding_ref(table: &Matrix, ids: &[u32], out: &mut [f32]) -> Result<()> {
    check_args(table, ids, out)?;
    let all = table.to_f32_vec();
    let dim = table.cols();
    for (i, &id) in ids.iter().enumerate() {
        let src = &all[id as usize * dim..(id as usize + 1) * dim];
        out[i * dim..(i + 1) * dim].copy_from_slice(src);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::kernels::testutil::vec_f32;
    use proptest::prelude::*;

    #[test]
    fn errors() {
        let t = Matrix::from_f32(3, 2, vec![0.0; 6]).unwrap();
        let mut out = [0.0; 4];
        assert!(matches!(
            embedding(&t, &[0, 3], &mut out),
            Err(Error::IndexOutOfRange {
                op: OP,
                index: 3,
                len: 3
            })
        ));
        assert_eq!(out, [0.0; 4]);
        assert!(matches!(
            embedding(&t, &[0], &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(embedding(&t, &[], &mut []).is_ok());
        let p = t.prepack();
        assert!(matches!(
            embedding_prepacked(&p, &[0, 3], &mut out),
            Err(Error::IndexOutOfRange { index: 3, .. })
        ));
        assert!(matches!(
            embedding_prepacked(&p, &[0], &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn large_parallel() {
        let t = Matrix::from_f32(50, 700, (0..35_000).map(|i| i as f32).collect()).unwrap();
        let ids: Vec<u32> = (0..60).map(|i| (i * 7 % 50) as u32).collect();
        let mut a = vec![0.0; 60 * 700];
        let mut b = vec![1.0; 60 * 700];
        embedding(&t, &ids, &mut a).unwrap();
        embedding_ref(&t, &ids, &mut b).unwrap();
        assert_eq!(a, b);
        let mut c = vec![2.0; 60 * 700];
        embedding_prepacked(&t.prepack(), &ids, &mut c).unwrap();
        assert_eq!(c, b);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn matches_ref(
            (rows, cols, data) in (1usize..20, 0usize..40)
                .prop_flat_map(|(r, c)| (Just(r), Just(c), vec_f32(r * c))),
            ids in proptest::collection::vec(0u32..1000, 0..12),
            dt in 0usize..3,
        ) {
            let dtype = [DType::F32, DType::F16, DType::BF16][dt];
            let t = Matrix::from_f32(rows, cols, data).unwrap().to_dtype(dtype);
            let ids: Vec<u32> = ids.iter().map(|i| i % rows as u32).collect();
            let mut a = vec![0.0; ids.len() * cols];
            let mut b = vec![1.0; ids.len() * cols];
            embedding(&t, &ids, &mut a).unwrap();
            embedding_ref(&t, &ids, &mut b).unwrap();
            let mut c = vec![2.0; ids.len() * cols];
            embedding_prepacked(&t.prepack(), &ids, &mut c).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(c, b);
        }
    }
}

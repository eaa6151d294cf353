//! NIfTI-1 volumes (`.nii`, `.nii.gz`) in and out.
//!
//! Reading: the file is decompressed first (gzip is recognised by its magic bytes 1f 8b, not by the file name, and
//! decoding to the end checks the gzip CRC-32 and length, so a truncated or corrupted download is an error rather
//! than a silently wrong volume; only the bytes the header declares are kept, after checking that the file can hold
//! them), then the 348-byte header is parsed by the `nifti` crate and the voxel block at `vox_offset` is converted to
//! f32 with the scaling `value = scl_slope * stored + scl_inter` (no scaling when `scl_slope` is 0 or not finite, as
//! the standard says). A NaN or infinite voxel, or a spacing outside [`SPACING_RANGE`], is an error.
//!
//! Axes: NIfTI stores the array [x, y, z] with x fastest; our arrays are (D, H, W) row-major with W fastest, so
//! D = z, H = y, W = x and the bytes are already in our order: no transposition happens anywhere in this file.
//! Spacings are reported in our order, `[z, y, x] = [pixdim[3], pixdim[2], pixdim[1]]`.
//!
//! The affine maps voxel indices (i, j, k) = (x, y, z) to world millimetres (NIfTI RAS+):
//! - sform (`sform_code > 0`): the rows `srow_x`, `srow_y`, `srow_z`;
//! - else qform (`qform_code > 0`): `world = R · diag(dx, dy, qfac·dz) · (i, j, k) + (qoffset_x, qoffset_y,
//!   qoffset_z)`, with R the rotation of the unit quaternion (a, b, c, d), a = sqrt(1 - b² - c² - d²);
//! - else the scaling diag(dx, dy, dz) with the origin at voxel 0 (the standard's "method 1").
//!
//! The affine is computed here rather than with the crate's helpers because those panic on some malformed headers
//! (negative pixdim, a non-unit quaternion); bad input must be an error, never a panic.
//!
//! Writing: a label map is written as uint8 with the reference image's header (qform, sform, pixdim, units), so a
//! prediction opens on the grid of the image it was predicted for; files are written under a temporary name and
//! renamed, so a failed write leaves no partial file.
//!
//! A round trip: a synthetic phantom written as an image and a label map, read back unchanged; a file that is not
//! NIfTI is refused with its name.
//!
//! ```
//! use lkm_engine::data::nifti::{header_for, read_volume, write_image, write_label};
//! use lkm_engine::data::synth::{phantom_case, SynthConfig};
//!
//! # fn main() -> lkm_engine::Result<()> {
//! let dir = std::env::temp_dir().join(format!("lkm-doc-nifti-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).expect("a temporary folder");
//! let case = phantom_case(0, &SynthConfig { cases: 1, shape: [6, 10, 8], seed: 1 });
//! let header = header_for(case.shape, [2.5, 0.8, 0.7])?; // spacing [z, y, x] = (D, H, W) in mm
//! write_image(dir.join("p_0000.nii.gz"), &case.image, case.shape, &header)?;
//! write_label(dir.join("p.nii.gz"), case.label.as_deref().expect("phantoms are labelled"), case.shape, &header)?;
//!
//! let image = read_volume(dir.join("p_0000.nii.gz"))?;
//! assert_eq!((image.shape, image.data.as_slice()), ([6, 10, 8], case.image.as_slice()));
//! assert!(image.spacing.iter().zip([2.5, 0.8, 0.7]).all(|(a, b)| (a - b).abs() < 1e-6));
//! assert_eq!(Some(read_volume(dir.join("p.nii.gz"))?.to_labels()?), case.label);
//!
//! std::fs::write(dir.join("notes.nii"), "not an image").expect("a file");
//! let err = read_volume(dir.join("notes.nii")).unwrap_err().to_string();
//! assert!(err.contains("notes.nii") && err.contains("not a NIfTI"), "{err}");
//! std::fs::remove_dir_all(&dir).expect("cleanup");
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ::nifti::writer::WriterOptions;
use ::nifti::{InMemNiftiVolume, IntoNdArray, NiftiError, NiftiHeader, NiftiType};
use flate2::read::GzDecoder;

use crate::{bail, ensure, Error, Result};

/// The NIfTI-1 header's size in bytes.
const HEADER_BYTES: usize = 348;
/// The largest expansion of a deflate stream (its maximal run encoding), about 1032:1.
const MAX_DEFLATE_RATIO: usize = 1032;
/// Voxel spacings accepted, in the file's units (millimetres): from microscopy-like 1 µm to 1 m.
pub const SPACING_RANGE: (f64, f64) = (1e-3, 1e3);

/// A volume read from a NIfTI file, in our (D, H, W) order.
#[derive(Clone, Debug)]
pub struct NiftiVolume {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    /// Intensities (or label values) as f32, (D, H, W) row-major, scaling already applied.
    pub data: Vec<f32>,
    /// Spatial size [D, H, W] = [z, y, x].
    pub shape: [usize; 3],
    /// Voxel spacing [z, y, x] in the file's units (millimetres for medical images), from pixdim.
    pub spacing: [f64; 3],
    /// The header as read, kept to write predictions on the same grid (see [`write_label`]).
    pub header: NiftiHeader,
    /// Voxel (x, y, z) to world 4x4 affine, row-major (`affine[row][col]`), see the module header for the rules.
    pub affine: [[f64; 4]; 4],
}

/// Reads a 3-D NIfTI-1 file (gzipped or not) of any numeric stored type into f32.
///
/// 4-D files whose 4th axis has length 1 are accepted; any other extra axis is an error (multi-channel data comes
/// as one file per channel in nnU-Net datasets). 1-D and 2-D files are read as volumes with D (and H) of 1.
pub fn read_volume(path: impl AsRef<Path>) -> Result<NiftiVolume> {
    let path = path.as_ref();
    let file = std::fs::read(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    parse_volume(&file, path)
}

/// Parses the bytes of a NIfTI-1 file (gzipped or not), as [`read_volume`] does; `path` names the file in messages.
///
/// Nothing is allocated beyond what the header asks for once that has been checked against the file's length (the
/// gzip bound of `decompress`), and non-finite voxels are an error naming the file and counting them: a NaN would
/// otherwise spread through the normalisation statistics and every window that overlaps it.
pub fn parse_volume(file: &[u8], path: &Path) -> Result<NiftiVolume> {
    let p = path.display();
    let bytes = decompress(file, path)?;
    let header = NiftiHeader::from_reader(&bytes[..]).map_err(|e| match e {
        NiftiError::Io(_) => Error::Data(format!(
            "{p}: not a NIfTI file: {} bytes, shorter than the 348-byte NIfTI-1 header",
            bytes.len()
        )),
        NiftiError::InvalidFormat => {
            let magic: Vec<u8> = bytes.get(344..348).unwrap_or(&[]).to_vec();
            Error::Data(format!(
                "{p}: not a NIfTI-1 file (magic bytes at offset 344 are {magic:02x?}, expected \"n+1\\0\"){}",
                if bytes.len() >= 4 && bytes[..4] == [0x1c, 0x02, 0, 0] {
                    "; this looks like NIfTI-2, which is not supported"
                } else {
                    ""
                }
            ))
        }
        e => Error::Data(format!("{p}: bad NIfTI header: {e}")),
    })?;
    ensure!(
        &header.magic == b"n+1\0",
        Data,
        "{p}: a NIfTI header-only file (magic \"ni1\", an .hdr/.img pair); only single-file .nii/.nii.gz is supported"
    );
    ensure!(
        header.sizeof_hdr == 348,
        Data,
        "{p}: not a NIfTI-1 file (sizeof_hdr is {}, expected 348)",
        header.sizeof_hdr
    );

    let ndim = header.dim[0] as usize;
    ensure!(
        (1..=7).contains(&ndim),
        Data,
        "{p}: corrupt header: dim[0] = {} (the number of axes must be 1 to 7)",
        header.dim[0]
    );
    let dims = &header.dim[1..=ndim];
    ensure!(
        dims.iter().all(|&d| d > 0 && d <= i16::MAX as u16),
        Data,
        "{p}: a shape with zero (or negative) size: dim = {dims:?}"
    );
    ensure!(
        dims.iter().skip(3).all(|&d| d == 1),
        Data,
        "{p}: a {ndim}-D image with dim = {dims:?}; only 3-D images (or 4-D with a 4th axis of 1) are supported \
         (nnU-Net datasets store each channel in its own file, _0000, _0001, ...)"
    );
    let xyz = [0, 1, 2].map(|a| dims.get(a).copied().unwrap_or(1) as usize);
    let shape = [xyz[2], xyz[1], xyz[0]];
    let n: usize = shape.iter().product();

    let spacing_of = |a: usize| -> Result<f64> {
        if a >= ndim {
            return Ok(1.0);
        }
        let s = header.pixdim[a + 1].abs() as f64;
        ensure!(
            s.is_finite() && (SPACING_RANGE.0..=SPACING_RANGE.1).contains(&s),
            Data,
            "{p}: voxel spacing pixdim[{}] = {} is not in the range {} to {} (mm) that medical images use",
            a + 1,
            header.pixdim[a + 1],
            SPACING_RANGE.0,
            SPACING_RANGE.1
        );
        Ok(s)
    };
    let spacing = [spacing_of(2)?, spacing_of(1)?, spacing_of(0)?];

    let datatype =
        header.data_type().map_err(|_| Error::Data(format!("{p}: unknown NIfTI datatype code {}", header.datatype)))?;
    let Some(elem) = bytes_per_voxel(datatype) else {
        bail!(
            Data,
            "{p}: voxel type {datatype:?} is not supported (only real scalar types: u8, i8, u16, i16, u32, i32, u64, \
             i64, f32, f64)"
        )
    };
    let offset = header.vox_offset;
    ensure!(offset.is_finite() && offset >= 348.0, Data, "{p}: corrupt header: vox_offset = {offset}");
    let start = offset as usize;
    let nbytes = n * elem;
    ensure!(
        start.checked_add(nbytes).is_some_and(|end| bytes.len() >= end),
        Data,
        "{p}: truncated: a {:?} volume of {xyz:?} voxels needs {nbytes} bytes after offset {start}, the file has {}",
        datatype,
        bytes.len().saturating_sub(start)
    );

    // The crate converts each stored type to f32 and applies slope and intercept; give it a 3-D header and a
    // well-defined scaling so that a 4-D file with one volume or a NaN slope need no special case there.
    let mut h3 = header.clone();
    h3.dim = [3, xyz[0] as u16, xyz[1] as u16, xyz[2] as u16, 1, 1, 1, 1];
    h3.bitpix = (elem * 8) as i16;
    if !h3.scl_slope.is_finite() || h3.scl_slope == 0.0 {
        h3.scl_slope = 0.0; // the crate's (and the standard's) code for "no scaling"
        h3.scl_inter = 0.0;
    } else if !h3.scl_inter.is_finite() {
        h3.scl_inter = 0.0;
    }
    let raw = bytes[start..start + nbytes].to_vec();
    drop(bytes);
    let array = InMemNiftiVolume::from_raw_data(&h3, raw)
        .and_then(|v| v.into_ndarray::<f32>())
        .map_err(|e| Error::Data(format!("{p}: cannot decode the voxels: {e}")))?;
    // The array is [x, y, z] in Fortran order, so its memory is x fastest: exactly our (D, H, W) row-major.
    ensure!(array.t().is_standard_layout(), Data, "{p}: internal: the nifti crate returned a non-Fortran-order array");
    let (data, off) = array.into_raw_vec_and_offset();
    ensure!(
        data.len() == n && off.unwrap_or(0) == 0,
        Data,
        "{p}: internal: decoded {} voxels, expected {n}",
        data.len()
    );

    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let i = data.iter().position(|v| !v.is_finite()).unwrap_or(0);
        let (h, w) = (shape[1], shape[2]);
        bail!(
            Data,
            "{p}: {bad} of {n} voxels are NaN or infinite (the first at (d, h, w) = ({}, {}, {})); the engine does not \
             invent values for them: replace them (e.g. with the image's minimum) and retry",
            i / (h * w),
            (i / w) % h,
            i % w
        );
    }
    let affine = affine_of(&header);
    Ok(NiftiVolume { path: path.to_path_buf(), data, shape, spacing, header, affine })
}

impl NiftiVolume {
    /// The values as a label map: every value must be a whole number in 0..=255 (float-stored label maps, common
    /// in converted datasets, are accepted when their values are whole numbers).
    pub fn to_labels(&self) -> Result<Vec<u8>> {
        labels_from_f32(&self.data, self.shape, &self.path.display().to_string())
    }
}

/// Converts label values stored as f32 to u8, naming the first voxel that is not a whole number in 0..=255.
fn labels_from_f32(data: &[f32], shape: [usize; 3], what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len());
    for (i, &v) in data.iter().enumerate() {
        if !((0.0..=255.0).contains(&v) && v == v.round()) {
            let (h, w) = (shape[1], shape[2]);
            bail!(
                Data,
                "{what}: label value {v} at voxel (d, h, w) = ({}, {}, {}) is not a whole number in 0..=255",
                i / (h * w),
                (i / w) % h,
                i % w
            );
        }
        out.push(v as u8);
    }
    Ok(out)
}

/// Writes a uint8 label map of `shape` [D, H, W] on the grid of `reference` (its qform, sform, pixdim and units),
/// gzip-compressed when the file name ends in `.gz`.
///
/// The reference's spatial size must equal `shape`: a prediction is written on the grid of the image it came from.
pub fn write_label(path: impl AsRef<Path>, labels: &[u8], shape: [usize; 3], reference: &NiftiHeader) -> Result<()> {
    let path = path.as_ref();
    check_reference(path, shape, reference)?;
    let mut h = reference.clone();
    h.cal_min = 0.0;
    h.cal_max = 0.0;
    h.intent_code = 0;
    write_array(path, labels, shape, &h, NiftiType::Uint8)
}

/// Writes an f32 image of `shape` [D, H, W] (one channel) with the grid of `reference`, gzip-compressed when the
/// file name ends in `.gz`. Used to write synthetic datasets and resampled images.
pub fn write_image(path: impl AsRef<Path>, data: &[f32], shape: [usize; 3], reference: &NiftiHeader) -> Result<()> {
    let path = path.as_ref();
    check_reference(path, shape, reference)?;
    let mut h = reference.clone();
    h.cal_min = 0.0;
    h.cal_max = 0.0;
    write_array(path, data, shape, &h, NiftiType::Float32)
}

/// A fresh header for a volume of `shape` [D, H, W] with `spacing` [z, y, x] in millimetres: axis-aligned (RAS+
/// identity rotation), origin at voxel 0, qform and sform both set (code 1, scanner) so every viewer agrees.
pub fn header_for(shape: [usize; 3], spacing: [f64; 3]) -> Result<NiftiHeader> {
    ensure!(
        shape.iter().all(|&s| s > 0 && s <= i16::MAX as usize),
        Shape,
        "header_for: shape {shape:?} must have sizes 1..=32767"
    );
    ensure!(
        spacing.iter().all(|&s| s.is_finite() && s > 0.0),
        Shape,
        "header_for: spacing {spacing:?} must be positive"
    );
    let [sz, sy, sx] = spacing.map(|s| s as f32);
    let mut h = NiftiHeader {
        dim: [3, shape[2] as u16, shape[1] as u16, shape[0] as u16, 1, 1, 1, 1],
        pixdim: [1.0, sx, sy, sz, 1.0, 1.0, 1.0, 1.0],
        xyzt_units: 2, // millimetres
        qform_code: 1,
        sform_code: 1,
        quatern_b: 0.0,
        quatern_c: 0.0,
        quatern_d: 0.0,
        srow_x: [sx, 0.0, 0.0, 0.0],
        srow_y: [0.0, sy, 0.0, 0.0],
        srow_z: [0.0, 0.0, sz, 0.0],
        magic: *b"n+1\0",
        scl_slope: 1.0,
        scl_inter: 0.0,
        ..NiftiHeader::default()
    };
    h.descrip = b"lkm-engine".to_vec();
    h.descrip.resize(80, 0);
    Ok(h)
}

/// The reference header must describe a grid of the written shape.
fn check_reference(path: &Path, shape: [usize; 3], reference: &NiftiHeader) -> Result<()> {
    let p = path.display();
    let ndim = (reference.dim[0] as usize).clamp(1, 7);
    let xyz = [0, 1, 2].map(|a| if a < ndim { reference.dim[a + 1] as usize } else { 1 });
    let ref_shape = [xyz[2], xyz[1], xyz[0]];
    ensure!(
        ref_shape == shape,
        Shape,
        "{p}: the volume to write has shape [D, H, W] = {shape:?} but its reference header describes {ref_shape:?}; \
         a volume must be written on its own grid"
    );
    Ok(())
}

/// Writes `data` (our (D, H, W) order) with the reference header's geometry and the given stored type.
fn write_array<T: ::nifti::DataElement + bytemuck::Pod>(
    path: &Path,
    data: &[T],
    shape: [usize; 3],
    reference: &NiftiHeader,
    datatype: NiftiType,
) -> Result<()> {
    let p = path.display();
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    ensure!(
        name.ends_with(".nii") || name.ends_with(".nii.gz"),
        Config,
        "{p}: a NIfTI output file name must end in .nii or .nii.gz"
    );
    ensure!(
        shape.iter().all(|&s| s > 0 && s <= i16::MAX as usize),
        Shape,
        "{p}: cannot write a volume of shape {shape:?} (each size must be 1..=32767)"
    );
    let n: usize = shape.iter().product();
    ensure!(data.len() == n, Shape, "{p}: {} values given for a volume of shape {shape:?} ({n} voxels)", data.len());
    // Our (D, H, W) row-major buffer is the NIfTI [x, y, z] Fortran-order buffer; the crate's reader-side volume
    // turns it into the Fortran-order array its writer expects.
    let dim = [3, shape[2] as u16, shape[1] as u16, shape[0] as u16, 1, 1, 1, 1];
    let bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
    let array = InMemNiftiVolume::from_raw_fields(dim, datatype, 0.0, 0.0, bytes, ::nifti::Endianness::native())
        .and_then(|v| v.into_ndarray::<T>())
        .map_err(|e| Error::Data(format!("{p}: cannot prepare the volume for writing: {e}")))?;
    let mut h = reference.clone();
    h.endianness = ::nifti::Endianness::native();
    h.magic = *b"n+1\0";
    h.sizeof_hdr = 348;
    if h.descrip.len() != 80 {
        h.descrip.resize(80, 0);
    }
    // The crate rebuilds the file name from its last extension (a case named `a.b.nii` would land in `a.nii`), and
    // a failed write must not leave a partial file under the real name: write to a hidden temporary name with no
    // other dot, then rename it.
    static TEMPORARIES: AtomicUsize = AtomicUsize::new(0);
    let ending = if name.ends_with(".gz") { "nii.gz" } else { "nii" };
    let tmp = path.with_file_name(format!(
        ".lkm-partial-{}-{}.{ending}",
        std::process::id(),
        TEMPORARIES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = WriterOptions::new(&tmp)
        .reference_header(&h)
        .write_nifti(&array)
        .map_err(|e| Error::Io(format!("{p}: cannot write: {e}")))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::Io(format!("{p}: cannot write: {e}"))));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The bytes of a NIfTI file after gunzipping (when it starts with the gzip magic bytes 1f 8b).
///
/// A gzip stream can expand about 1032 times, so a small file could ask for gigabytes. The header is decoded
/// first; the bytes it declares (offset plus voxels) are decoded only if a deflate stream of this file's length can
/// hold them, and the rest of the stream is decoded without being kept, so that the CRC and length are still checked.
fn decompress<'a>(file: &'a [u8], path: &Path) -> Result<Cow<'a, [u8]>> {
    if !file.starts_with(&[0x1f, 0x8b]) {
        return Ok(Cow::Borrowed(file));
    }
    let p = path.display();
    let corrupt = |e: std::io::Error| {
        Error::Data(format!("{p}: corrupt or truncated gzip data ({e}); re-copy or re-export the file"))
    };
    let mut gz = GzDecoder::new(file);
    let mut bytes = Vec::new();
    let _ = (&mut gz).take(HEADER_BYTES as u64).read_to_end(&mut bytes).map_err(corrupt)?;
    let declared = NiftiHeader::from_reader(&bytes[..]).ok().and_then(|h| declared_bytes(&h)).unwrap_or(0);
    ensure!(
        declared <= MAX_DEFLATE_RATIO.saturating_mul(file.len()),
        Data,
        "{p}: corrupt header: it declares {declared} bytes of data, more than a gzip file of {} bytes can hold",
        file.len()
    );
    let rest = declared.saturating_sub(bytes.len()) as u64;
    let _ = (&mut gz).take(rest).read_to_end(&mut bytes).map_err(corrupt)?;
    let _ = std::io::copy(&mut gz, &mut std::io::sink()).map_err(corrupt)?;
    Ok(Cow::Owned(bytes))
}

/// The header's `vox_offset` plus its voxel block in bytes, when the header is well-formed enough to say.
fn declared_bytes(h: &NiftiHeader) -> Option<usize> {
    let ndim = h.dim[0] as usize;
    let dims = h.dim.get(1..=ndim).filter(|_| ndim >= 1)?;
    let voxels = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize))?;
    let elem = bytes_per_voxel(h.data_type().ok()?)?;
    let offset = h.vox_offset;
    (offset.is_finite() && offset >= 0.0).then_some(())?;
    voxels.checked_mul(elem)?.checked_add(offset as usize)
}

/// Bytes of one stored voxel for the real scalar types the reader converts; `None` for the others.
fn bytes_per_voxel(t: NiftiType) -> Option<usize> {
    match t {
        NiftiType::Uint8 | NiftiType::Int8 => Some(1),
        NiftiType::Uint16 | NiftiType::Int16 => Some(2),
        NiftiType::Uint32 | NiftiType::Int32 | NiftiType::Float32 => Some(4),
        NiftiType::Uint64 | NiftiType::Int64 | NiftiType::Float64 => Some(8),
        _ => None,
    }
}

/// The voxel-to-world affine by the NIfTI-1 rules (sform, else qform, else pixdim scaling); never panics.
fn affine_of(h: &NiftiHeader) -> [[f64; 4]; 4] {
    let px = [1, 2, 3].map(|a| {
        let s = h.pixdim[a].abs() as f64;
        if s.is_finite() && s > 0.0 {
            s
        } else {
            1.0
        }
    });
    if h.sform_code > 0 {
        let r = |row: &[f32; 4]| row.map(|v| v as f64);
        return [r(&h.srow_x), r(&h.srow_y), r(&h.srow_z), [0.0, 0.0, 0.0, 1.0]];
    }
    if h.qform_code > 0 {
        let (mut b, mut c, mut d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let n2 = b * b + c * c + d * d;
        let a = if n2 < 1.0 {
            (1.0 - n2).sqrt()
        } else {
            // A 180-degree rotation (a = 0); renormalise (b, c, d) so that R stays a rotation.
            let n = n2.sqrt();
            b /= n;
            c /= n;
            d /= n;
            0.0
        };
        let rot = [
            [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
            [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
            [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let scale = [px[0], px[1], qfac * px[2]];
        let off = [h.quatern_x, h.quatern_y, h.quatern_z].map(|v| v as f64);
        let mut m = [[0.0; 4]; 4];
        for r in 0..3 {
            for col in 0..3 {
                m[r][col] = rot[r][col] * scale[col];
            }
            m[r][3] = off[r];
        }
        m[3][3] = 1.0;
        return m;
    }
    [[px[0], 0.0, 0.0, 0.0], [0.0, px[1], 0.0, 0.0], [0.0, 0.0, px[2], 0.0], [0.0, 0.0, 0.0, 1.0]]
}

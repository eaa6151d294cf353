//! Pictures for people: the training curves (`progress.png`, [`progress`]), label maps drawn over their image
//! ([`overlay`]) and the one-page HTML run report ([`report`]).
//!
//! Everything is drawn into an [`RgbImage`] and written as PNG. Text is rendered by plotters from the DejaVu Sans
//! font compiled into the binary, so pictures look the same on every machine, with or without system fonts.

pub mod overlay;
pub mod progress;
pub mod report;

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::train::checkpoint::write_atomically;
use crate::{Error, Result};

/// The font family name under which the embedded font is registered with plotters.
const FONT: &str = "sans-serif";

/// An 8-bit RGB picture: `pixels` holds `height` rows of `width` pixels, 3 bytes (R, G, B) each.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major RGB bytes, `3 * width * height` of them.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// A picture of one colour.
    pub fn filled(width: usize, height: usize, colour: [u8; 3]) -> RgbImage {
        RgbImage { width, height, pixels: colour.repeat(width * height) }
    }

    /// The colour of pixel (x, y).
    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * self.width + x);
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Sets pixel (x, y).
    pub fn put(&mut self, x: usize, y: usize, colour: [u8; 3]) {
        let i = 3 * (y * self.width + x);
        self.pixels[i..i + 3].copy_from_slice(&colour);
    }

    /// Copies `other` in with its top-left corner at (x0, y0), clipped to this picture.
    pub fn paste(&mut self, other: &RgbImage, x0: usize, y0: usize) {
        let w = other.width.min(self.width.saturating_sub(x0));
        for y in 0..other.height.min(self.height.saturating_sub(y0)) {
            let src = &other.pixels[3 * y * other.width..][..3 * w];
            let start = 3 * ((y0 + y) * self.width + x0);
            self.pixels[start..start + 3 * w].copy_from_slice(src);
        }
    }

    /// Draws `text` with its top-left corner at (x, y), `size` pixels high.
    pub fn text(&mut self, text: &str, x: i32, y: i32, size: u32, colour: [u8; 3]) -> Result<()> {
        register_font();
        let (w, h) = (self.width as u32, self.height as u32);
        let area = BitMapBackend::with_buffer(&mut self.pixels, (w, h)).into_drawing_area();
        let colour = RGBColor(colour[0], colour[1], colour[2]);
        let style = TextStyle::from((FONT, size).into_font()).color(&colour);
        area.draw_text(text, &style, (x, y)).map_err(|e| drawing_error("text", e))?;
        area.present().map_err(|e| drawing_error("text", e))
    }
}

/// The width in pixels of `text` drawn `size` pixels high.
pub fn text_width(text: &str, size: u32) -> usize {
    register_font();
    (FONT, size).into_font().box_size(text).map_or(0, |(w, _)| w as usize)
}

/// Encodes a picture as PNG (8-bit RGB).
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width as u32, image.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let fail = |e: png::EncodingError| Error::Data(format!("encoding a {}x{} PNG: {e}", image.width, image.height));
    let mut writer = encoder.write_header().map_err(fail)?;
    writer.write_image_data(&image.pixels).map_err(fail)?;
    writer.finish().map_err(fail)?;
    Ok(bytes)
}

/// Writes a picture to `path` as PNG, atomically (a viewer refreshing the file never sees half of it).
pub fn write_png(path: &Path, image: &RgbImage) -> Result<()> {
    write_atomically(path, &encode_png(image)?)
}

/// Registers the embedded DejaVu Sans with plotters as "sans-serif" (once per process).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err() {
            panic!("the embedded DejaVu Sans font does not parse");
        }
    });
}

/// A plotters failure as an engine error naming what was being drawn.
fn drawing_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Data(format!("drawing {what}: {e}"))
}

/// Name of class `k` (0 = background) from a list of class names that starts with the background, as in
/// dataset.json and checkpoint metadata; `class k` when the list has no such entry.
pub fn class_label(class_names: &[String], k: usize) -> String {
    class_names.get(k).cloned().unwrap_or_else(|| format!("class {k}"))
}

/// The class names (background first) stored in a checkpoint's run metadata, empty when there are none.
pub fn class_names(run_meta: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(run_meta["class_names"].clone()).unwrap_or_default()
}

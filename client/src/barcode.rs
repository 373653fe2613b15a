//! Indicia as printed 2D barcodes: a Data Matrix (ECC 200) symbol holding the indicium's
//! bytes exactly (the encoder picks Base256 for binary data), drawn as a PNG (8-bit
//! grayscale) or an SVG (one square per dark module), with the quiet zone the standard asks
//! for around it.

use std::path::{Path, PathBuf};

use datamatrix::{DataMatrix, SymbolList};

/// Image pixels per module in a PNG (a 0.25 mm module is 6 px at 600 dpi).
pub const PNG_MODULE_PX: usize = 6;
/// Light modules around the symbol (the standard asks for at least one).
pub const QUIET_ZONE_MODULES: usize = 2;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BarcodeError {
    #[error("{0}: the barcode format follows the extension, .png or .svg")]
    Format(String),
    #[error("the indicium does not fit a Data Matrix symbol: {0:?}")]
    Encode(datamatrix::data::DataEncodingError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Png {
        path: String,
        source: png::EncodingError,
    },
}

/// What image format a path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Svg,
}

impl ImageFormat {
    pub fn of(path: &Path) -> Result<Self, BarcodeError> {
        match path
            .extension()
            .and_then(|ext| ext.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => Ok(Self::Png),
            Some("svg") => Ok(Self::Svg),
            _ => Err(BarcodeError::Format(path.display().to_string())),
        }
    }
}

/// The symbol's modules, row by row: `true` is dark. Quiet zone not included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modules {
    pub width: usize,
    pub height: usize,
    pub dark: Vec<bool>,
}

impl Modules {
    /// Encodes `bytes` in the smallest square symbol that holds them.
    pub fn encode(bytes: &[u8]) -> Result<Self, BarcodeError> {
        let symbol = DataMatrix::encode(bytes, SymbolList::default().enforce_square())
            .map_err(BarcodeError::Encode)?;
        let bitmap = symbol.bitmap();
        let (width, height) = (bitmap.width(), bitmap.height());
        let mut dark = vec![false; width * height];
        for (x, y) in bitmap.pixels() {
            dark[y * width + x] = true;
        }
        Ok(Self {
            width,
            height,
            dark,
        })
    }

    fn is_dark(&self, x: usize, y: usize) -> bool {
        self.dark[y * self.width + x]
    }

    /// An 8-bit grayscale raster (0 dark, 255 light), `module_px` pixels per module, with
    /// the quiet zone: (width, height, pixels).
    pub fn raster(&self, module_px: usize) -> (usize, usize, Vec<u8>) {
        let width = (self.width + 2 * QUIET_ZONE_MODULES) * module_px;
        let height = (self.height + 2 * QUIET_ZONE_MODULES) * module_px;
        let mut pixels = vec![255u8; width * height];
        for y in 0..self.height {
            for x in 0..self.width {
                if !self.is_dark(x, y) {
                    continue;
                }
                let left = (x + QUIET_ZONE_MODULES) * module_px;
                let top = (y + QUIET_ZONE_MODULES) * module_px;
                for row in top..top + module_px {
                    pixels[row * width + left..row * width + left + module_px].fill(0);
                }
            }
        }
        (width, height, pixels)
    }

    /// The PNG file's bytes.
    pub fn png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let (width, height, pixels) = self.raster(PNG_MODULE_PX);
        let mut out = Vec::new();
        {
            // The raster is a few hundred pixels wide: the casts cannot truncate.
            let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
            encoder.set_color(png::ColorType::Grayscale);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header()?;
            writer.write_image_data(&pixels)?;
            writer.finish()?;
        }
        Ok(out)
    }

    /// The SVG document: a light background and one 1x1 square per dark module, in module
    /// units (the viewer scales it; `shape-rendering="crispEdges"` keeps edges sharp).
    pub fn svg(&self) -> String {
        let width = self.width + 2 * QUIET_ZONE_MODULES;
        let height = self.height + 2 * QUIET_ZONE_MODULES;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" \
             width=\"{}\" height=\"{}\" shape-rendering=\"crispEdges\">\n\
             <rect x=\"0\" y=\"0\" width=\"{width}\" height=\"{height}\" fill=\"#fff\"/>\n",
            width * PNG_MODULE_PX,
            height * PNG_MODULE_PX,
        );
        for y in 0..self.height {
            for x in 0..self.width {
                if self.is_dark(x, y) {
                    svg.push_str(&format!(
                        "<rect x=\"{}\" y=\"{}\" width=\"1\" height=\"1\" fill=\"#000\"/>\n",
                        x + QUIET_ZONE_MODULES,
                        y + QUIET_ZONE_MODULES
                    ));
                }
            }
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// A file to draw a barcode into, and its format (from its extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarcodeFile {
    pub path: PathBuf,
    pub format: ImageFormat,
}

impl BarcodeFile {
    pub fn new(path: PathBuf) -> Result<Self, BarcodeError> {
        let format = ImageFormat::of(&path)?;
        Ok(Self { path, format })
    }

    /// The file for piece `piece` of several: see [`numbered_path`].
    pub fn numbered(&self, piece: u64) -> Self {
        Self {
            path: numbered_path(&self.path, piece),
            format: self.format,
        }
    }

    /// Draws `bytes` as a Data Matrix symbol into this file.
    pub fn write(&self, bytes: &[u8]) -> Result<(), BarcodeError> {
        let path = &self.path;
        let modules = Modules::encode(bytes)?;
        let data = match self.format {
            ImageFormat::Png => modules.png().map_err(|source| BarcodeError::Png {
                path: path.display().to_string(),
                source,
            })?,
            ImageFormat::Svg => modules.svg().into_bytes(),
        };
        std::fs::write(path, data).map_err(|source| BarcodeError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

/// The file for piece `piece` when several indicia are rendered: `label.png` becomes
/// `label-<piece>.png`.
pub fn numbered_path(path: &Path, piece: u64) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(String::new, |stem| stem.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{piece}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{piece}"),
    };
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_follow_the_extension() {
        assert_eq!(
            ImageFormat::of(Path::new("a.PNG")).ok(),
            Some(ImageFormat::Png)
        );
        assert_eq!(
            ImageFormat::of(Path::new("x/a.svg")).ok(),
            Some(ImageFormat::Svg)
        );
        assert!(ImageFormat::of(Path::new("a.jpg")).is_err());
        assert!(ImageFormat::of(Path::new("a")).is_err());
    }

    #[test]
    fn numbered_paths_keep_directory_and_extension() {
        assert_eq!(
            numbered_path(Path::new("out/label.png"), 42),
            Path::new("out/label-42.png")
        );
        assert_eq!(numbered_path(Path::new("label"), 7), Path::new("label-7"));
    }

    #[test]
    fn indicia_fit_square_symbols_of_44_to_48_modules() {
        // Binary data of an indicium's sizes (125 to 157 bytes), not compressible by the
        // text encodations.
        let bytes: Vec<u8> = (0..157u32).map(|i| (i * 97 + 13) as u8 | 0x80).collect();
        assert_eq!(Modules::encode(&bytes[..125]).unwrap().width, 44);
        assert_eq!(Modules::encode(&bytes[..142]).unwrap().width, 44);
        assert_eq!(Modules::encode(&bytes).unwrap().width, 48);
    }

    #[test]
    fn the_raster_has_a_light_quiet_zone_and_dark_finder_edges() {
        let modules = Modules::encode(&[0xA5; 157]).unwrap();
        assert_eq!(modules.width, modules.height);
        let (width, height, pixels) = modules.raster(2);
        assert_eq!(width, (modules.width + 2 * QUIET_ZONE_MODULES) * 2);
        assert_eq!(pixels.len(), width * height);
        // Quiet zone: the first rows are light.
        assert!(pixels[..width * QUIET_ZONE_MODULES * 2]
            .iter()
            .all(|p| *p == 255));
        // The "L" finder pattern: the left column and bottom row of modules are all dark.
        assert!((0..modules.height).all(|y| modules.is_dark(0, y)));
        assert!((0..modules.width).all(|x| modules.is_dark(x, modules.height - 1)));
    }
}

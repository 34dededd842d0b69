//! Importers: every model enters edgepack through one of these and comes out in the internal
//! layout ([`crate::model::Model`]).

pub mod gguf;
pub mod hf;

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::Model;

/// Opens a model: a Hugging Face folder or a `.gguf` file.
pub fn open(path: &Path) -> Result<Model> {
    if path.is_dir() {
        hf::import_folder(path)
    } else if path.is_file() {
        let mut magic = [0u8; 4];
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
        if n == 4 && &magic == crate::gguf::GGUF_MAGIC {
            gguf::import_gguf(path)
        } else {
            Err(Error::format(
                path,
                "magic",
                "not a GGUF file and not a model folder",
            ))
        }
    } else {
        Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ))
    }
}

pub mod decode;
pub mod kafka;

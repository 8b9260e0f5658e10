//! Image references (`host[:port]/path[:tag][@digest]`). Written by a helper.

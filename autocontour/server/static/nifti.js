// Masks between the page and the server: read the server's NIfTI masks (on the job's input grid) into the
// page's canonical axial layout, and write what the reviewer drew as a minimal uncompressed NIfTI-1 on that
// grid (348-byte header, 4-byte empty extension, uint8 voxels). No library: the header is a few fixed fields,
// and gzip is the browser's own DecompressionStream.
"use strict";

const NIFTI_DATA_OFFSET = 352;
const NIFTI_READERS = { 2: "getUint8", 4: "getInt16", 8: "getInt32", 16: "getFloat32", 64: "getFloat64",
                        256: "getInt8", 512: "getUint16", 768: "getUint32" };
const NIFTI_SIZES = { 2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4 };

// The canonical volume's layout and its map to the input grid, from the review JSON's `grid`.
function canonicalLayout(grid) {
  const m = grid.to_input.matrix, o = grid.to_input.offset, dim = grid.nifti.dim;
  const inputSize = [dim[1], dim[2], dim[3]];
  // canonical axis a runs along the input axis whose matrix entry in column a is not zero
  const size = [0, 1, 2].map((a) => inputSize[[0, 1, 2].find((r) => m[r][a] !== 0)]);
  return { m, o, inputSize, nx: size[0], ny: size[1], nz: size[2] };
}

// For each canonical voxel (x fastest, then y, then z): its linear index in the input's voxel array.
function forEachVoxel(layout, visit) {
  const { m, o, inputSize: [ni, nj] } = layout;
  const stride = [1, ni, ni * nj];
  const step = [0, 1, 2].map((a) => m[0][a] * stride[0] + m[1][a] * stride[1] + m[2][a] * stride[2]);
  const origin = o[0] * stride[0] + o[1] * stride[1] + o[2] * stride[2];
  let canonical = 0;
  for (let z = 0; z < layout.nz; z++) {
    for (let y = 0; y < layout.ny; y++) {
      let input = origin + step[2] * z + step[1] * y;
      for (let x = 0; x < layout.nx; x++, canonical++, input += step[0]) visit(canonical, input);
    }
  }
}

// The input k slice (NIfTI third axis) an axial canonical slice z is, and back.
function inputSlice(layout, z) { return layout.m[2][2] * z + layout.o[2]; }
function canonicalSlice(layout, k) { return (k - layout.o[2]) / layout.m[2][2]; }

async function gunzipIfNeeded(buffer) {
  const head = new Uint8Array(buffer, 0, 2);
  if (head[0] !== 0x1f || head[1] !== 0x8b) return buffer;
  const stream = new Blob([buffer]).stream().pipeThrough(new DecompressionStream("gzip"));
  return await new Response(stream).arrayBuffer();
}

// A NIfTI mask (.nii or .nii.gz bytes) on the input grid -> canonical Uint8Array of 0/1.
async function readMask(layout, buffer) {
  const view = new DataView(await gunzipIfNeeded(buffer));
  const type = view.getInt16(70, true), offset = view.getFloat32(108, true);
  const read = NIFTI_READERS[type], size = NIFTI_SIZES[type];
  if (!read) throw new Error("unsupported NIfTI data type " + type);
  const mask = new Uint8Array(layout.nx * layout.ny * layout.nz);
  forEachVoxel(layout, (c, i) => { mask[c] = view[read](offset + i * size, true) !== 0 ? 1 : 0; });
  return mask;
}

// The canonical mask's slices `zs` (all others left empty) as an uncompressed NIfTI-1 Blob on the input grid.
function writeMask(layout, nifti, mask, zs) {
  const [ni, nj, nk] = layout.inputSize;
  const buffer = new ArrayBuffer(NIFTI_DATA_OFFSET + ni * nj * nk);
  const view = new DataView(buffer);
  view.setInt32(0, 348, true);
  nifti.dim.forEach((v, i) => view.setInt16(40 + 2 * i, v, true));
  view.setInt16(70, 2, true);  // uint8
  view.setInt16(72, 8, true);  // bits per voxel
  nifti.pixdim.forEach((v, i) => view.setFloat32(76 + 4 * i, v, true));
  view.setFloat32(108, NIFTI_DATA_OFFSET, true);
  view.setFloat32(112, 1, true);  // scl_slope: the values are the values
  view.setUint8(123, nifti.xyzt_units);
  view.setInt16(252, nifti.qform_code, true);
  view.setInt16(254, nifti.sform_code, true);
  ["quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"]
    .forEach((f, i) => view.setFloat32(256 + 4 * i, nifti[f], true));
  [...nifti.srow_x, ...nifti.srow_y, ...nifti.srow_z].forEach((v, i) => view.setFloat32(280 + 4 * i, v, true));
  [0x6e, 0x2b, 0x31, 0].forEach((c, i) => view.setUint8(344 + i, c));  // "n+1\0": header and data in one file
  const data = new Uint8Array(buffer, NIFTI_DATA_OFFSET);
  const plane = layout.nx * layout.ny, wanted = new Set(zs);
  forEachVoxel(layout, (c, i) => { if (mask[c] && wanted.has(Math.floor(c / plane))) data[i] = 1; });
  return new Blob([buffer], { type: "application/octet-stream" });
}

package dev.xpertfl.fleet;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * One array of an {@code ArrayRecord}: dtype, shape and little-endian C-order data.
 *
 * <p>Flower's {@code Array} with {@code stype="numpy.ndarray"} carries the bytes of
 * {@code numpy.save(..., allow_pickle=False)}, i.e. the NPY format (v1.0 header). This class reads
 * and writes that format for the dtypes XPerT uses; {@link #toNpy()} writes the same bytes as
 * numpy 1.x/2.x for C-ordered arrays, so an array built here has the same Flower object id as one
 * built in Python.
 */
public final class NdArray {
    public static final String STYPE_NUMPY = "numpy.ndarray";
    private static final byte[] MAGIC = {(byte) 0x93, 'N', 'U', 'M', 'P', 'Y'};
    private static final Pattern DESCR = Pattern.compile("'descr':\\s*'([^']+)'");
    private static final Pattern FORTRAN = Pattern.compile("'fortran_order':\\s*(True|False)");
    private static final Pattern SHAPE = Pattern.compile("'shape':\\s*\\(([^)]*)\\)");

    /** numpy dtype name ("float32", "float64", "int64", "int32", "bool"). */
    public final String dtype;
    public final long[] shape;
    /** Raw element bytes, little-endian, C order. */
    public final byte[] data;

    public NdArray(String dtype, long[] shape, byte[] data) {
        this.dtype = dtype;
        this.shape = shape.clone();
        this.data = data;
        long n = numel();
        if (n * itemSize(dtype) != data.length) {
            throw new IllegalArgumentException(
                    "array " + dtype + Arrays.toString(shape) + " needs " + n * itemSize(dtype)
                            + " bytes, got " + data.length);
        }
    }

    public static NdArray ofFloats(long[] shape, float[] values) {
        ByteBuffer b = ByteBuffer.allocate(values.length * 4).order(ByteOrder.LITTLE_ENDIAN);
        b.asFloatBuffer().put(values);
        return new NdArray("float32", shape, b.array());
    }

    public long numel() {
        long n = 1;
        for (long d : shape) n *= d;
        return n;
    }

    public int ndim() {
        return shape.length;
    }

    public static int itemSize(String dtype) {
        switch (dtype) {
            case "float32": case "int32": return 4;
            case "float64": case "int64": return 8;
            case "float16": case "int16": return 2;
            case "bool": case "int8": case "uint8": return 1;
            default: throw new IllegalArgumentException("unsupported dtype " + dtype);
        }
    }

    private static String descr(String dtype) {
        switch (dtype) {
            case "float32": return "<f4";
            case "float64": return "<f8";
            case "float16": return "<f2";
            case "int64": return "<i8";
            case "int32": return "<i4";
            case "int16": return "<i2";
            case "int8": return "|i1";
            case "uint8": return "|u1";
            case "bool": return "|b1";
            default: throw new IllegalArgumentException("unsupported dtype " + dtype);
        }
    }

    private static String dtypeOf(String descr) {
        switch (descr) {
            case "<f4": return "float32";
            case "<f8": return "float64";
            case "<f2": return "float16";
            case "<i8": return "int64";
            case "<i4": return "int32";
            case "<i2": return "int16";
            case "|i1": return "int8";
            case "|u1": return "uint8";
            case "|b1": return "bool";
            default: throw new IllegalArgumentException("unsupported NPY dtype '" + descr
                    + "' (big-endian, structured and object arrays are refused)");
        }
    }

    /** Values as float32 (float64 arrays are narrowed). */
    public float[] toFloats() {
        ByteBuffer b = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
        float[] out = new float[(int) numel()];
        if (dtype.equals("float32")) {
            b.asFloatBuffer().get(out);
        } else if (dtype.equals("float64")) {
            for (int i = 0; i < out.length; i++) out[i] = (float) b.getDouble();
        } else {
            throw new IllegalArgumentException("expected a float32/float64 array, got " + dtype);
        }
        return out;
    }

    /** Values as float64. */
    public double[] toDoubles() {
        ByteBuffer b = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
        double[] out = new double[(int) numel()];
        if (dtype.equals("float64")) {
            b.asDoubleBuffer().get(out);
        } else if (dtype.equals("float32")) {
            for (int i = 0; i < out.length; i++) out[i] = b.getFloat();
        } else {
            throw new IllegalArgumentException("expected a float32/float64 array, got " + dtype);
        }
        return out;
    }

    // --- NPY -------------------------------------------------------------------------------------
    /** The bytes numpy.save writes for this array (format 1.0, header padded to 64 bytes). */
    public byte[] toNpy() {
        StringBuilder sh = new StringBuilder("(");
        for (int i = 0; i < shape.length; i++) {
            if (i > 0) sh.append(", ");
            sh.append(shape[i]);
        }
        if (shape.length == 1) sh.append(',');
        sh.append(')');
        String dict = "{'descr': '" + descr(dtype) + "', 'fortran_order': False, 'shape': " + sh + ", }";
        int total = MAGIC.length + 2 + 2 + dict.length() + 1; // + '\n'
        int pad = (64 - total % 64) % 64;
        StringBuilder header = new StringBuilder(dict);
        for (int i = 0; i < pad; i++) header.append(' ');
        header.append('\n');
        byte[] h = header.toString().getBytes(StandardCharsets.ISO_8859_1);
        if (h.length > 65535) throw new IllegalArgumentException("NPY header too long");
        ByteBuffer out = ByteBuffer.allocate(MAGIC.length + 4 + h.length + data.length).order(ByteOrder.LITTLE_ENDIAN);
        out.put(MAGIC).put((byte) 1).put((byte) 0).putShort((short) h.length).put(h).put(data);
        return out.array();
    }

    /** Parses NPY bytes (versions 1.0-3.0, C order, little-endian numeric dtypes). */
    public static NdArray fromNpy(byte[] npy) {
        if (npy.length < 10 || !Arrays.equals(Arrays.copyOf(npy, 6), MAGIC)) {
            throw new IllegalArgumentException("not an NPY array (bad magic)");
        }
        int major = npy[6];
        ByteBuffer b = ByteBuffer.wrap(npy).order(ByteOrder.LITTLE_ENDIAN);
        int headerLen;
        int offset;
        if (major == 1) {
            headerLen = Short.toUnsignedInt(b.getShort(8));
            offset = 10;
        } else if (major == 2 || major == 3) {
            if (npy.length < 12) throw new IllegalArgumentException("truncated NPY header");
            headerLen = b.getInt(8);
            offset = 12;
        } else {
            throw new IllegalArgumentException("unsupported NPY version " + major);
        }
        if (headerLen < 0 || offset + headerLen > npy.length) throw new IllegalArgumentException("truncated NPY header");
        String header = new String(npy, offset, headerLen, StandardCharsets.ISO_8859_1);
        Matcher d = DESCR.matcher(header);
        Matcher f = FORTRAN.matcher(header);
        Matcher s = SHAPE.matcher(header);
        if (!d.find() || !f.find() || !s.find()) throw new IllegalArgumentException("malformed NPY header: " + header.trim());
        if (f.group(1).equals("True")) throw new IllegalArgumentException("Fortran-ordered NPY arrays are not supported");
        String dtype = dtypeOf(d.group(1));
        String[] parts = s.group(1).split(",");
        long[] shape = Arrays.stream(parts).map(String::trim).filter(p -> !p.isEmpty()).mapToLong(Long::parseLong).toArray();
        byte[] data = Arrays.copyOfRange(npy, offset + headerLen, npy.length);
        long expected = itemSize(dtype);
        for (long dim : shape) expected *= dim;
        if (expected != data.length) {
            throw new IllegalArgumentException("NPY data has " + data.length + " bytes, shape " + Arrays.toString(shape)
                    + " of " + dtype + " needs " + expected + " (truncated or corrupted array)");
        }
        return new NdArray(dtype, shape, data);
    }

    @Override
    public String toString() {
        return dtype + Arrays.toString(shape);
    }
}

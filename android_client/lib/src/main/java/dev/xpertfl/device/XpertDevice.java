package dev.xpertfl.device;

import dev.xpertfl.device.Adapter.AdapterException;
import dev.xpertfl.device.Selection.Choice;
import dev.xpertfl.device.Selection.DimensionException;
import dev.xpertfl.fleet.FleetNode;
import dev.xpertfl.fleet.Json;
import dev.xpertfl.fleet.NdArray;
import dev.xpertfl.fleet.Records.ConfigRecord;
import dev.xpertfl.fleet.Records.MetricRecord;
import dev.xpertfl.fleet.Records.RecordDict;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.logging.Logger;

/**
 * The XPerT device on top of {@link FleetNode}: answers the three message types of the contract in
 * {@code protocol/__init__.py} exactly as the Python ClientApp does.
 *
 * <ul>
 *   <li>{@code query.register} → config "register" {user, label?}</li>
 *   <li>{@code query.select} (arrays "basis"/"vectors" k×d, "coords"/"coords" n×k, config "select"/"meta")
 *       → the device's coordinate on the basis (Eq. 2, from its drift embedding, or a coordinate it
 *       already has, less the server's share of the human-text offset, "basis"/"human_offset"), then
 *       Eq. 1 / merge → config "choice"/"choice" (no distances, no coordinate)</li>
 *   <li>{@code train} (config "train"/"meta" + "start-i.arrays/.config" per chosen id) → checks each
 *       adapter's content hash against the choice, merges if asked, trains through {@link Trainer},
 *       uploads "upload.arrays/.config", metrics "finetune" and config "report"/"meta"</li>
 * </ul>
 *
 * Anything else, or input that breaks the contract, throws: {@link FleetNode} turns that into an
 * error reply with the reason, and the server records it and goes on.
 */
public final class XpertDevice implements FleetNode.Handler {
    private static final Logger LOG = Logger.getLogger("xpert.device");

    /** Who the device is and what it knows about its own style. */
    public static final class Profile {
        public final String user;
        public final String label; // evaluation only; null: not reported
        /** The device's drift embedding (summarizer space, R^d), or null if {@link #coordinate} is given. */
        public final double[] embedding;
        /** Summarizer fingerprint the embedding was computed with (null: not checked). */
        public final String summarizer;
        /** A precomputed coordinate on the server's basis (k entries: Eq. 2 of the device's drift), used when
         *  there is no embedding; the server's human offset is removed from it as from an embedding's. */
        public final double[] coordinate;

        public Profile(String user, String label, double[] embedding, String summarizer, double[] coordinate) {
            if (user == null || user.isEmpty()) throw new IllegalArgumentException("a device needs a non-empty user id");
            if ((embedding == null) == (coordinate == null)) throw new IllegalArgumentException("give a drift embedding or a coordinate");
            this.user = user;
            this.label = label;
            this.embedding = embedding;
            this.summarizer = summarizer;
            this.coordinate = coordinate;
        }
    }

    private final Profile profile;
    private final Trainer trainer;
    /** What the last select/train did (for the app's status screen and for tests). */
    public volatile String lastStatus = "idle";

    public XpertDevice(Profile profile, Trainer trainer) {
        this.profile = profile;
        this.trainer = trainer;
    }

    @Override
    public RecordDict handle(FleetNode.Received msg) throws Exception {
        switch (msg.messageType()) {
            case "query.register": return register();
            case "query.select": return select(msg.content);
            case "train": return train(msg.content);
            default:
                throw new UnsupportedOperationException("unknown message type '" + msg.messageType()
                        + "': this XPerT device handles query.register, query.select and train");
        }
    }

    RecordDict register() {
        ConfigRecord r = new ConfigRecord().put("user", profile.user);
        if (profile.label != null) r.put("label", profile.label);
        lastStatus = "registered as " + profile.user;
        return new RecordDict().put("register", r);
    }

    // --- select ------------------------------------------------------------------------------------
    @SuppressWarnings("unchecked")
    RecordDict select(RecordDict content) {
        Map<String, Object> meta = Json.parseObject(content.config("select").getString("meta"));
        NdArray vectors = content.arrays("basis").get("vectors");
        NdArray coords = content.arrays("coords").get("coords");
        List<String> ids = new ArrayList<>();
        for (Object o : (List<Object>) meta.get("ids")) ids.add((String) o);
        List<Object> words = (List<Object>) meta.get("words");
        long dim = ((Number) meta.get("dim")).longValue();
        int k = words.size();
        if (vectors.ndim() != 2 || vectors.shape[0] != k || vectors.shape[1] != dim) {
            throw new DimensionException("basis vectors " + vectors + " do not match its " + k + " words x dim " + dim);
        }
        if (coords.ndim() != 2 || coords.shape[0] != ids.size() || coords.shape[1] != k) {
            throw new DimensionException("coords " + coords + " do not match " + ids.size() + " pLLMs x " + k + " words");
        }
        double delta = ((Number) meta.get("delta")).doubleValue();
        int maxParents = ((Number) meta.get("max_parents")).intValue();
        Object summarizer = meta.get("summarizer");

        double[] user;
        if (profile.embedding != null) {
            if (profile.embedding.length != dim) {
                throw new DimensionException("basis dimension " + dim + " != the device's drift embedding dimension "
                        + profile.embedding.length + ": the device's summarizer differs from the server's");
            }
            if (profile.summarizer != null && summarizer instanceof String && !((String) summarizer).isEmpty()
                    && !summarizer.equals(profile.summarizer)) {
                throw new DimensionException("basis was built with summarizer " + summarizer + ", the device's embedding with "
                        + profile.summarizer + ": coordinates would not be comparable");
            }
            user = Selection.coordinates(profile.embedding, rows(vectors));
        } else {
            if (profile.coordinate.length != k) {
                throw new DimensionException("the device's precomputed coordinate has " + profile.coordinate.length
                        + " entries but the basis has " + k + " words");
            }
            user = profile.coordinate.clone();
        }
        double[][] basisRows = rows(vectors);
        removeHumanOffset(user, content, meta, dim, basisRows);
        // empty cache: start from the base model (as the Python device); the dimensions are checked anyway
        // "drift" (default of new servers): Euclidean between the drifts coordinates reconstruct; "l1": Eq. 1
        Object distance = meta.getOrDefault("distance", "l1");
        if (!"drift".equals(distance) && !"l1".equals(distance)) {
            throw new IllegalArgumentException("unknown selection distance " + distance + ": expected drift or l1");
        }
        boolean euclidean = "drift".equals(distance);
        double[][] offered = euclidean ? Selection.drifts(rows(coords), basisRows) : rows(coords);
        double[] mine = euclidean ? Selection.drift(user, basisRows) : user;
        Choice choice = ids.isEmpty() ? Choice.base(0.0) : Selection.select(mine, ids, offered, delta, maxParents, euclidean);
        lastStatus = "chose " + choice + " among " + ids.size() + " pLLM(s), basis " + k + " words";
        LOG.info(profile.user + ": " + lastStatus + explain(words, user));
        return new RecordDict().put("choice", new ConfigRecord().put("choice", choice.toJson()));
    }

    /**
     * The users' footing ({@code Basis.user_coordinates}): a device's drift compares human text with
     * generated text, a pLLM's generated with generated; the server sends the offset between the two
     * ("basis"/"human_offset", d) and the share of it to remove (meta "human_weight"). Eq. 2 is linear,
     * so removing {@code weight * Eq2(offset)} from the coordinate equals Eq. 2 of {@code e - weight * offset}.
     */
    private static void removeHumanOffset(double[] user, RecordDict content, Map<String, Object> meta, long dim,
                                          double[][] basisRows) {
        double weight = ((Number) meta.getOrDefault("human_weight", 0.0)).doubleValue();
        if (weight == 0.0) return;
        if (!(weight > 0.0) || Double.isInfinite(weight)) throw new IllegalArgumentException("human_weight must be finite and >= 0, got " + weight);
        NdArray offset = content.arrays("basis").get("human_offset");
        if (offset.ndim() != 1 || offset.shape[0] != dim) {
            throw new DimensionException("human offset " + offset + " does not match the basis dimension " + dim);
        }
        double[] shift = Selection.coordinates(offset.toDoubles(), basisRows);
        for (int i = 0; i < user.length; i++) user[i] -= weight * shift[i];
    }

    private static String explain(List<Object> words, double[] c) {
        StringBuilder b = new StringBuilder(c.length > 0 ? "; own coordinate " : "");
        for (int i = 0; i < c.length && i < words.size(); i++) b.append(String.format("%s%.3f %s", i > 0 ? " · " : "", c[i], words.get(i)));
        return b.toString();
    }

    static double[][] rows(NdArray m) {
        double[] flat = m.toDoubles();
        int r = (int) m.shape[0], c = (int) m.shape[1];
        double[][] out = new double[r][c];
        for (int i = 0; i < r; i++) System.arraycopy(flat, i * c, out[i], 0, c);
        return out;
    }

    // --- train -------------------------------------------------------------------------------------
    @SuppressWarnings("unchecked")
    RecordDict train(RecordDict content) throws Exception {
        Map<String, Object> meta = Json.parseObject(content.config("train").getString("meta"));
        if (!(meta.get("finetune") instanceof Map) || !(meta.get("choice") instanceof String)) {
            throw new IllegalArgumentException("train meta must hold a 'choice' JSON string and a 'finetune' object");
        }
        Choice choice = Choice.fromJson((String) meta.get("choice"));
        List<Adapter> adapters = new ArrayList<>();
        for (int i = 0; i < choice.ids.size(); i++) {
            Adapter a = Adapter.from(content, "start-" + i);
            String hash = a.contentHash();
            if (!hash.equals(choice.ids.get(i))) {
                throw new AdapterException("received adapter " + i + " has content hash " + hash + ", not the chosen " + choice.ids.get(i));
            }
            adapters.add(a);
        }
        Adapter start;
        switch (choice.kind) {
            case "base": start = trainer.initial(); break;
            case "single": start = adapters.get(0); break;
            default: start = Merge.cat(adapters, choice.weights);
        }
        trainer.check(start);
        Trainer.Result result = trainer.train(start, (Map<String, Object>) meta.get("finetune"));
        RecordDict reply = new RecordDict();
        result.adapter.putInto(reply, "upload");
        MetricRecord metrics = new MetricRecord();
        for (Map.Entry<String, Object> e : result.metrics.entrySet()) if (e.getValue() != null) metrics.put(e.getKey(), e.getValue());
        reply.put("finetune", metrics);
        Map<String, Object> report = new LinkedHashMap<>();
        report.put("start", choice.kind);
        report.put("stop_reason", result.stopReason);
        reply.put("report", new ConfigRecord().put("meta", Json.dumps(report)));
        lastStatus = "trained from " + choice.kind + " " + choice.ids + ": " + result.stopReason + ", uploaded " + result.adapter.contentHash();
        LOG.info(profile.user + ": " + lastStatus);
        return reply;
    }
}

// Report sections and sentences, CSV parsing, and the left/right swap that goes with a flip.

import ConvirtCore
import ConvirtData
import ConvirtText
import Foundation
import Testing

@Suite("Reports and CSV")
struct ReportTests {
    @Test("Findings and Impression are kept, other sections dropped, sentences split")
    func sections() {
        let report = """
                                         FINAL REPORT
         EXAMINATION:  CHEST (PA AND LAT)

         INDICATION:  ___F with cough. Evaluate for pneumonia.

         COMPARISON:  Chest radiograph from ___.

         FINDINGS:

         There is a small left pleural effusion. The heart size is normal, measuring 4.5 cm
         across the mediastinum. No pneumothorax.
         1. Lines: none.

         Impressions: Left lower lobe consolidation, likely pneumonia!
         Recommend follow-up? Yes.
         NOTIFICATION:  Dr. ___ was paged at 10:30.
        """
        let sentences = ReportSections.sentences(report)
        #expect(sentences == [
            "There is a small left pleural effusion.",
            "The heart size is normal, measuring 4.5 cm across the mediastinum.",
            "Left lower lobe consolidation, likely pneumonia!",
        ], "\(sentences)")
        #expect(ReportSections.sentences("no sections at all, just text.").isEmpty)
        #expect(ReportSections.sentences("").isEmpty)
        #expect(ReportSections.sentences("findings: mild cardiomegaly is present.") == ["mild cardiomegaly is present."])
    }

    @Test("section names as MIMIC-CXR's parser reads them: variants, misspellings, view descriptions; labelled lines stay text")
    func sectionNames() {
        let report = """
                                         FINAL REPORT
         CHEST, TWO VIEWS:  The lungs are clear without consolidation.

         CLINICAL HISTORY:  Fever and a cough for three days.

         PA AND LATERAL VIEWS OF THE CHEST:
         Lungs: Mild bibasilar atelectasis is seen.
         Heart and mediastinum: The heart size is normal.
         TIME:10:30 the film was reviewed again.

         Clinical history: This text is not a finding.

         FINDINGS AND IMPRESSION:  No acute cardiopulmonary process.
         FINDINGS/IMPRESSION:  Stable small left effusion.
         IMPRESSON:  Unchanged mild cardiomegaly.
         LUNGS:  A capitalised label heads a section of its own, as in MIMIC-CXR's parser.
         Conclusions: Lines and tubes are in place.
         RECOMMENDATION(S):  Follow-up radiograph in two weeks.
        """
        let sentences = ReportSections.sentences(report)
        #expect(sentences == [
            "The lungs are clear without consolidation.",
            "Lungs: Mild bibasilar atelectasis is seen.",
            "Heart and mediastinum: The heart size is normal.",
            "TIME:10:30 the film was reviewed again.",
            "No acute cardiopulmonary process.",
            "Stable small left effusion.",
            "Unchanged mild cardiomegaly.",
            "Lines and tubes are in place.",
        ], "\(sentences)")
        // Abbreviations end no sentence; a line of spaces is a blank line (MIMIC-CXR writes " \n").
        let notified = " IMPRESSION:\n No pneumothorax is seen\n \n Findings discussed with Dr. ___ at 10:30 a.m. on ___. "
            + "Mild edema vs. atelectasis at the bases. The end.\n"
        #expect(ReportSections.sentences(notified) == ["No pneumothorax is seen", "Findings discussed with Dr. ___ at 10:30 a.m. on ___.",
                                                        "Mild edema vs. atelectasis at the bases."], "\(ReportSections.sentences(notified))")
        #expect(ReportSections.header(" FINDINGS AND IMPRESSION:")?.0 == "impression")
        #expect(ReportSections.header(" Impressions: x")?.0 == "impression")
        #expect(ReportSections.header(" Lungs: clear") == nil)
        #expect(ReportSections.header(" COMPARISON:  ___.")?.0 == "comparison")
    }

    @Test("CSV: quotes, CRLF, missing columns, malformed rows")
    func csv() throws {
        let text = "dicom_id,study_id,note\r\na1,10,\"has, comma\"\r\na2,11,\"say \"\"hi\"\"\"\r\nbroken,row\r\na3,12,\"multi\nline\"\r\n"
        let table = try CSVTable(text: text, path: "x.csv", required: ["dicom_id", "study_id"])
        #expect(table.rows.count == 3)
        #expect(table.value(table.rows[0], "note") == "has, comma")
        #expect(table.value(table.rows[1], "note") == "say \"hi\"")
        #expect(table.value(table.rows[2], "note") == "multi\nline")
        #expect(table.malformedLines == [4])
        #expect(throws: ConvirtError("x.csv: missing required column(s) split, subject_id (header: dicom_id,study_id,note)")) {
            try CSVTable(text: text, path: "x.csv", required: ["dicom_id", "split", "subject_id"])
        }
        #expect(throws: ConvirtError("e.csv: empty CSV file (no header)")) { try CSVTable(text: "", path: "e.csv") }
        #expect(csvLine(["a", "b,c", "d\"e"]) == "a,\"b,c\",\"d\"\"e\"\n")
    }

    @Test("a flip swaps left and right, keeping case")
    func laterality() {
        #expect(Augment.swapLaterality("Left effusion, right pneumothorax; LEFT lung. Leftover righteous.")
                == "Right effusion, left pneumothorax; RIGHT lung. Leftover righteous.")
    }
}
